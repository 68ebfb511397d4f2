"""The curate stage: exact and MinHash dedup, quality and perplexity filters over text shards.

datatrove does the work underneath (its MinHash stages, filters and LocalPipelineExecutor with
completion markers); this package reads and writes the project's text shards around it.
"""
