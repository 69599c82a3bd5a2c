"""Three SGD steps of causal_lm_adaptive_kd (modes `loss`, `zero3`) or AdaptiveKDTrainer (mode `trainer`), in one
process or, under torchrun, sharded; saves the losses and the student's full weights.

    python tests/hf_sharded_worker.py MODE OUT

Mode `loss`: FSDP2, the student and the teacher each `fully_shard`-ed per decoder layer, at lm_head and at the
root, with reshard_after_forward=True everywhere. Mode `zero3`: the student in a DeepSpeed ZeRO-3 engine (every
parameter partitioned, none kept whole). In both every process distills its half of each batch, normalised by
the distilled tokens of both halves. Mode `trainer`: see run_trainer.
"""
import os
import sys

import torch
import torch.distributed as dist

from alphadiv_kernels.integrations.transformers import AdaptiveKDTrainer, causal_lm_adaptive_kd
from hf_models import collate, examples, student_and_teacher, training_arguments

STEPS, BATCH, LEARNING_RATE = 3, 4, 0.5
mode, out = sys.argv[1], sys.argv[2]
distributed = "WORLD_SIZE" in os.environ
torch.manual_seed(0)
student, teacher = student_and_teacher("llama")
data = examples(STEPS * BATCH)


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model.lm_head, reshard_after_forward=True)
    return fully_shard(model, reshard_after_forward=True)


def full_weights(model):
    weights = {}
    for name, value in model.state_dict().items():
        weights[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
    return weights


def zero3_engine(model):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": BATCH // dist.get_world_size(), "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}  # DeepSpeed clips at 1 by default
    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=config,
                                                   optimizer=torch.optim.SGD(model.parameters(), lr=LEARNING_RATE))
    return engine, optimizer


def zero3_full_weights(engine):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return full_weights(engine.module)


def run_loss(zero3=False):
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if distributed and zero3:
        model, optimizer = zero3_engine(student)
        frozen = teacher
    else:
        model, frozen = (shard(student), shard(teacher)) if distributed else (student, teacher)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for step in range(STEPS):
        batch = data[step * BATCH:(step + 1) * BATCH]
        share = BATCH // world
        inputs = collate(batch[rank * share:(rank + 1) * share])
        tokens = collate(batch)["labels"][:, 1:].ne(-100).sum()  # every process's distilled positions
        result = causal_lm_adaptive_kd(model, frozen, inputs, num_items_in_batch=tokens)
        # FSDP and ZeRO average the processes' gradients: each process's part of the loss is scaled back up.
        if distributed and zero3:
            model.backward(result.loss * world)
            model.step()
        else:
            (result.loss * world).backward()
            optimizer.step()
            optimizer.zero_grad()
        loss = result.loss.detach()
        if distributed:
            dist.all_reduce(loss)
        losses.append(loss.item())
    return losses, zero3_full_weights(model) if distributed and zero3 else full_weights(model)


def run_trainer():
    """Under torchrun, the student is loaded sharded by transformers' own FSDP2 (`from_pretrained(distributed_config=
    ...)`, every decoder layer and lm_head resharded after forward); the Trainer then trains it as it is."""
    model = student
    if distributed:
        from transformers import AutoModelForCausalLM, DistributedConfig

        folder = out + ".student"
        if dist.get_rank() == 0:
            student.save_pretrained(folder)
        dist.barrier()
        plan = {"model.layers.*": "free_full_weight", "lm_head": "free_full_weight"}
        model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(
            fsdp_size=dist.get_world_size(), fsdp_plan=plan))
    arguments = training_arguments(out + ".trainer", BATCH // int(os.environ.get("WORLD_SIZE", 1)), 1, STEPS,
                                   **({"ddp_backend": "gloo"} if distributed else {}))
    trainer = AdaptiveKDTrainer(model=model, teacher_model=teacher, args=arguments, train_dataset=data,
                                data_collator=collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, full_weights(model)


if distributed:
    dist.init_process_group("gloo")
losses, weights = run_trainer() if mode == "trainer" else run_loss(zero3=mode == "zero3")
if not distributed or dist.get_rank() == 0:
    torch.save({"losses": losses, "weights": weights}, out)
if distributed:
    dist.barrier()
    dist.destroy_process_group()
