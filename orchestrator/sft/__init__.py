"""Fine-tuning in the pipeline: ``orchestrate sft`` (``cli``) and one pipeline stage per SFT phase (``stages``)."""
