"""se3t benchmark suites (``python -m benchmarks <suite>``): throughput, latency, memory, utilisation and
equivariance error of se3t across fusion levels, precisions, low-memory mode, batch sizes and scatter backends;
scaling with graph size and degree; lucidrains' se3-transformer-pytorch as a peer. Not a test suite: results are
data (JSON, Markdown, PNG) under ``benchmarks/results``.

Modules: ``cli`` (commands), ``suite`` (result document, running cells), ``runner`` (child processes, timing,
peak memory), ``cells`` (the se3t measurement), ``data`` (inputs), ``flops`` (analytic FLOP count),
``machine`` (machine, versions, precisions, GEMM rate), ``qm9`` / ``scaling`` / ``peers`` (the suites),
``report`` (Markdown, plots, compare, README table).
"""
