"""The serving chapter: many prompts answered at once. batching.py decodes a few rows together
and refills a finished row's slot with the next prompt at once (continuous batching);
loading.py is the one model loader of sample.py and tools/hellaswag.py.
"""
