"""Collection, the first stage of the loop: prompt batches and their prompts.

Prompt import with hygiene, prompts written by labelers, and the database side of sampling K outputs per
prompt from the model that samples.
"""
