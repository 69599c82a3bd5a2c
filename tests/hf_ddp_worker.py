"""One distillation run with AdaptiveKDTrainer (under torchrun: one DDP process); saves the student's weights
and the logged kd_loss.

    python tests/hf_ddp_worker.py OUT PER_DEVICE ACCUMULATION STEPS
"""
import os
import sys

import torch

from alphadiv_kernels.integrations.transformers import AdaptiveKDTrainer
from hf_models import collate, examples, student_and_teacher, training_arguments

out, per_device, accumulation, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
student, teacher = student_and_teacher("llama")
distributed = {"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}
arguments = training_arguments(out + ".trainer", per_device, accumulation, steps, **distributed)
trainer = AdaptiveKDTrainer(model=student, teacher_model=teacher, args=arguments, train_dataset=examples(16),
                            data_collator=collate)
trainer.train()
if trainer.is_world_process_zero():
    torch.save({"weights": {name: value.detach().clone() for name, value in student.state_dict().items()},
                "kd_loss": [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]}, out)
if torch.distributed.is_initialized():
    # Gloo's worker threads must be stopped before the interpreter exits, or a process may abort at exit.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
