"""`safechat VERB`: one command line over the runtime, the offline tools, training and the benchmarks."""
