"""``python -m attn_lm.evaluate ckpt=... data=...``: perplexity and throughput of a checkpoint on
a whole split (deterministic pass, every token scored once), written to ``evaluation.json``."""
from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from .configure import CONF_DIR
from .lit_module import LitGPT
from .callbacks import device_name
from .train import check_writable, run_dir


def evaluate(cfg: DictConfig) -> dict:
    ckpt = Path(str(cfg.ckpt)).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist (pass ckpt=path/to/checkpoint.ckpt)")
    if cfg.split not in ("test", "validation"):
        raise ValueError(f"split={cfg.split!r}; valid: test, validation")
    out = run_dir()
    check_writable(out)
    L.seed_everything(int(cfg.seed))
    module = LitGPT.load_from_checkpoint(str(ckpt), map_location="cpu")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test" if cfg.split == "test" else "validate")
    if datamodule.vocab_size != module.model_config.vocab_size:
        raise ValueError(f"the data's tokenizer has {datamodule.vocab_size} tokens but the checkpoint was trained with "
                         f"{module.model_config.vocab_size}; use the data preset and tokenizer of the training run")
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(out), callbacks=[])
    run = trainer.test if cfg.split == "test" else trainer.validate
    start = time.perf_counter()
    metrics = run(module, datamodule=datamodule, verbose=False)[0]
    seconds = time.perf_counter() - start
    tokens = datamodule.split_stats[cfg.split]["tokens"]
    result = {"checkpoint": str(ckpt), "split": cfg.split, **{k: float(v) for k, v in metrics.items()},
              "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "device": device_name(trainer.strategy.root_device), "attention": module.model.layer_types}
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
