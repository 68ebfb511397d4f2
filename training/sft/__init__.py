"""Supervised fine-tuning after pretraining (seed 004): instruct, tool-calling and reasoning stages.

``records`` defines the canonical JSONL records, ``sources`` converts each hub dataset's own schema
into them, ``template`` turns any record into a conversation and token ids with a loss mask, and
``loader`` packs (or pads) those examples into the trainer's batches. The training loop is the same
as pretraining's (training/trainer.py); only the batches differ.
"""
