"""Train one model.

    python -m bonedist.train --model xception --shards shards/rsna --pretrained weights/
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml -m bonedist.train --model resnet50_patch \
        --shards shards/phantoms --preset tiny
    accelerate launch --config_file launch/accelerate/single_node.yaml -m bonedist.train --model resnet50_patch ...
"""

from bonedist.train.cli import main

raise SystemExit(main())
