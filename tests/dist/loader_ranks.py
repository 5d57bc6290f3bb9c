"""Run under `accelerate launch` by tests/test_data_dist.py: records what each rank's loaders yield.

    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml tests/dist/loader_ranks.py SHARDS OUT MODE
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from bonedist.data.source import DataConfig, open_split


def main() -> None:
    shards, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = DataConfig(shards=shards, batch_size=3, eval_batch_size=3, mode=mode, workers=2, balanced=False, seed=7)
    train = open_split(cfg, "train", accelerator.device, rank, world, progress=False, training=True)
    record = {"rank": rank, "world": world, "distributed_type": str(accelerator.distributed_type), "epochs": []}
    for epoch in range(2):
        train.set_epoch(epoch)
        keys, batches = [], 0
        for batch in train.training():
            keys.extend(batch["key"])
            batches += 1
            # a collective per step: with uneven batch counts one rank would hang here
            accelerator.wait_for_everyone()
        record["epochs"].append({"keys": keys, "batches": batches, "len": len(train)})
    for split in ("validation", "test"):
        positions, keys = [], []
        for batch in open_split(cfg, split, accelerator.device, rank, world).evaluation():
            positions.extend(batch["index"].tolist())
            keys.extend(batch["key"])
        gathered = gather_object(positions)  # variable length per rank: no padding, no truncation
        record[split] = {"positions": positions, "keys": keys, "gathered": [int(p) for p in gathered]}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
