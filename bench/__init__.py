"""Speed and quality benchmarks of the pipeline against the libraries people use instead (``make bench``;
``python -m bench.run --help``). Not tests: nothing here runs under pytest and no timing is asserted."""
