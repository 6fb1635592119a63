"""A Hugging Face Trainer script with max_grad_norm, a tiny model and data made here. A
callback prints the Trainer's own log of every step at full precision: step, loss, the
grad_norm the Trainer measured (pre-clip)."""

import argparse

import torch
import transformers
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--max-steps", type=int, default=12)
parser.add_argument("--max-grad-norm", type=float, default=0.3)
parser.add_argument("--output-dir", default="hf-out")
args = parser.parse_args()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.body(x)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


class PrintLogs(transformers.TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(f"step {state.global_step} loss {logs['loss']:.10g} norm {float(logs['grad_norm']):.10g}", flush=True)


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 4, generator=g), torch.randn(96, 1, generator=g) * 3
    data = [{"x": x[i], "labels": y[i]} for i in range(96)]
    targs = transformers.TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=8,
        max_steps=args.max_steps,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=args.max_grad_norm,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    transformers.Trainer(model=Tiny(), args=targs, train_dataset=data, callbacks=[PrintLogs()]).train()


if __name__ == "__main__":
    main()
