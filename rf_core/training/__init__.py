"""What runs in slot workers: the only package that imports torch.

`trainer` trains a run's chunk exactly (`SlotTrainer`), `worker` and `ray_workers` host it in a persistent process
or a Ray actor, `gang` and `zero` train one run on several devices, `checkpoints`, `statefiles` and `staging` keep
its state, `artifacts` exports it, `data` and `models` load what it trains on. The fit process uses the workers'
handles (`worker.SlotPool`), which load torch only inside the worker.
"""
