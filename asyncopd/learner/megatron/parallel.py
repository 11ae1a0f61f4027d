"""The megatron learner's process layout: tp * pp * dp ranks, megatron's parallel groups, and where a rank sits.

Megatron's rank order (tp fastest, then dp, then pp: "tp-cp-ep-dp-pp") puts the first TP rank of every stage
of DP replica 0 in the pipeline group of global rank 0, which is the rank that sends weights to the rollout
fleet (asyncopd.learner.group: rank 0 joins the weight-sync group).
"""

import datetime

import torch
import torch.distributed as dist

from asyncopd.config.schema import LearnerConfig
from asyncopd.learner.megatron import patches
from asyncopd.learner.megatron.convert import Placement, pipeline_spans
from asyncopd.weights.process_group import find_free_port


def init_parallel(cfg: LearnerConfig) -> bool:
    """Bring up torch.distributed (a 1-rank group when nothing started it) and megatron's TP / PP / DP groups.

    Returns True when it started the default process group itself (a single process)."""
    from megatron.core import parallel_state, tensor_parallel

    patches.apply()
    world_needed = cfg.tp * cfg.pp * cfg.dp
    created = not dist.is_initialized()
    if created:
        if world_needed != 1:
            raise RuntimeError(f"learner.tp * learner.pp * learner.dp = {world_needed} needs {world_needed} processes "
                               "in an initialised torch.distributed group; only a 1-rank layout starts its own")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=10))
    world = dist.get_world_size()
    if world != world_needed:
        raise ValueError(f"torch.distributed world size {world} != learner.tp * learner.pp * learner.dp = "
                         f"{cfg.tp} * {cfg.pp} * {cfg.dp}")
    if cfg.virtual_pp > 1 and cfg.pp == 1:
        raise ValueError(f"learner.virtual_pp={cfg.virtual_pp} needs learner.pp > 1 (the interleaved schedule "
                         "splits each pipeline stage into chunks)")
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.virtual_pp if cfg.virtual_pp > 1 else None)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed, force_reset_rng=True)
    return created


def placement(num_layers: int, cfg: LearnerConfig) -> Placement:
    """This rank's Placement (after init_parallel): groups, ranks and the layer spans of its model chunks."""
    from megatron.core import parallel_state as ps

    all_spans = pipeline_spans(num_layers, cfg.pp, cfg.virtual_pp)
    stage = ps.get_pipeline_model_parallel_rank()
    pp_group = ps.get_pipeline_model_parallel_group()
    stage_ranks = tuple(dist.get_process_group_ranks(pp_group)) if cfg.pp > 1 else (dist.get_rank(),)
    return Placement(tp_group=ps.get_tensor_model_parallel_group(), tp=cfg.tp,
                     tp_rank=ps.get_tensor_model_parallel_rank(), stage=stage, stage_ranks=stage_ranks,
                     dp_rank=ps.get_data_parallel_rank(), spans=tuple(all_spans[stage]),
                     all_spans=tuple(tuple(s) for s in all_spans))
