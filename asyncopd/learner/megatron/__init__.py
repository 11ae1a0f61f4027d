"""Everything megatron-core: the backend (model.py), HF <-> GPTModel conversion (convert.py), the CPU patches
and the FP8 switch (patches/). Nothing outside asyncopd.learner imports megatron."""
