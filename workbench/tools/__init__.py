"""Developer tools run from the command line: the demo, the benchmarks and the doc generators."""
