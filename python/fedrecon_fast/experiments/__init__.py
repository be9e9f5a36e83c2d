"""Research around FedRecon: the paper's baselines, its Table 1 and Figure 3, and plots.

- :mod:`.baselines`: centralized matrix factorization (SGD or ALS), stateful FedAvg, and
  StandardEval (Singhal et al., NeurIPS 2021, Table 1).
- :mod:`.paper`: the reproduction of Table 1 and the Figure 3 ablation (``fedrecon-fast paper``,
  ``fedrecon-fast ablation``).
- :mod:`.plots`: learning curves as PNG (matplotlib).
"""
