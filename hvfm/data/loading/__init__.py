"""Loading: samples to batches -- the dataset, sampler, collate and loader over annotation files
(`dataset`), the same over tar shards (`shards`), and evaluation's clips in annotation order
(`evaluation`)."""
