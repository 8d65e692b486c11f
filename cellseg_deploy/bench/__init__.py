"""Latency measurement of the runners: interleaved, stage by stage, with the environment and honest memory.

- :mod:`~cellseg_deploy.bench.api`: :func:`run_bench` (what ``cellseg-deploy bench`` does) and
  :class:`BenchRequest`.
- :mod:`~cellseg_deploy.bench.runner_bench`: :func:`run_benchmark` (the measurement), :class:`BenchSettings`,
  engine labels (``runner[:precision]``) and the definition of every stage.
- :mod:`~cellseg_deploy.bench.models`: which model file each engine reads, exports into a cache, and
  untrained models with a controlled detection count.
- :mod:`~cellseg_deploy.bench.workload`: the images (synthetic TIFFs or a dataset folder).
- :mod:`~cellseg_deploy.bench.sweep`: latency against cells and against image size.
- :mod:`~cellseg_deploy.bench.memory`: per-engine peak memory in a fresh process.
- :mod:`~cellseg_deploy.bench.stats`, :mod:`~cellseg_deploy.bench.timing`,
  :mod:`~cellseg_deploy.bench.environment`: statistics, device-synchronised timers, environment capture.
- :mod:`~cellseg_deploy.bench.report`: printed table, Markdown, JSON and PNG plots from the result dict.

The standard suite that writes ``benchmarks/results/`` is ``benchmarks/run_suite.py``.
"""
