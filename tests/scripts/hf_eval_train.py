"""A Hugging Face Trainer (tiny GPT-2 from a config, random weights, made-up data) that evaluates
every 3 of its 7 steps and writes its own log_history to argv[1]. It imports transformers after
torch, as scripts do, so under `gradscope run` the Trainer is patched at its import."""
import json
import sys
import warnings

import torch
import transformers

cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(cfg)
ids = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(2))
data = [{"input_ids": r, "labels": r} for r in ids[:32]]
held = [{"input_ids": r, "labels": r} for r in ids[32:]]
args = transformers.TrainingArguments(
    output_dir=sys.argv[2], max_steps=7, per_device_train_batch_size=4, learning_rate=3e-3,
    eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4, logging_steps=1, report_to=[],
    save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=held)
    trainer.train()
with open(sys.argv[1], "w") as f:
    json.dump(trainer.state.log_history, f)
