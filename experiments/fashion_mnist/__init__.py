"""Does packing K images per sequence (STAR) beat one image per sequence (ARM) on Fashion-MNIST? recipes.py holds
what runs, study.py runs it, context.py and tune.py are the follow-up measurements, and report.py writes
docs/results/fashion-mnist.md from the results (words in report_template.md, statistics in stats.py, figures in
plots.py)."""
