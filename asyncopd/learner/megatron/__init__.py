"""Everything megatron-core: the backend (model.py), the process layout (parallel.py), HF <-> GPTModel conversion
and the streamed weight export (convert.py), sharded checkpoints (checkpoint.py), the patches and the FP8 switch
(patches/). Nothing outside asyncopd.learner imports megatron."""
