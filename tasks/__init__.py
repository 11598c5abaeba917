"""Task and data generators shared by evaluators and trainers: synthetic language tasks, public
benchmark loaders (LongBench, LongVideoBench, MLVU), synthetic videos and video I/O."""
