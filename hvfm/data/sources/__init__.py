"""Sources: where a corpus comes from -- the benchmarks' annotation files read into one form
(`formats`, `annotations`) and the tar shards written from them for large trainings (`prepare`)."""
