"""The benchmark: training, sampling and serving speed on random tokens.

    python -m tools.bench --help

Its pages, in reading order: __main__.py (the settings, what is run, main), train_speed.py,
sample_speed.py, serve_speed.py, pipeline_speed.py (the bubble), measure.py (the clock and the
memory), tables.py (the report).
"""
