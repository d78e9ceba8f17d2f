"""Does packing K images per sequence (STAR) beat one image per sequence (ARM) on Fashion-MNIST? study.py runs
the arms, context.py and tune.py the follow-up measurements, report.py writes docs/results/fashion-mnist.md."""
