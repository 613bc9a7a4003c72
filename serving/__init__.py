"""The serving chapter: many prompts answered at once. Read in this order:
batching.py decodes a few rows together and refills a finished row's slot with the next prompt
at once (continuous batching), each slot reserving block_size positions; pages.py keeps every
request's keys and values in one pool of pages instead, through a page table each; prefix.py
lets prompts that begin alike share the pages of that beginning; engine.py schedules requests
onto the pool (admission and preemption by memory, chunked prefill in one forward with the
others' decode tokens). http.py serves the engine over HTTP to many clients at once, as
OpenAI's completions API: loop.py is the engine's one thread and the queue in front of it,
api.py the format of what comes and goes, playground.html the page a browser gets.
loading.py is the one model loader of sample.py, http.py and tools/hellaswag.py.
"""
