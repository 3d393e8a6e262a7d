"""The suite's parts and steps, what each may take, and how many rounds the timings run."""

DEADLINE_S = 540
RESERVE_S = 15        # kept back for the summary and the archive
KILL_GRACE_S = 5      # `timeout -k`: SIGTERM, then SIGKILL this much later

# step -> (budget on an H200, budget in a dry run) in seconds
BUDGETS = {
    "env": (15, 20), "extension": (150, 90), "tests": (120, 60), "ops": (60, 45), "graphs": (40, 20),
    "ceilings": (15, 15), "ops_compiled": (90, 45),
    "train_stage1": (240, 70), "train_stage2": (240, 60), "train_stage0": (90, 45),
}
SUB_BUDGETS = {"sync": (20, 10), "bench_fast": (15, 10), "bench_reference": (45, 30)}
PARTS = {
    "kernels": ("env", "extension", "tests", "ops", "graphs", "ceilings", "ops_compiled"),
    "train": ("env", "extension", "train_stage1", "train_stage2", "train_stage0"),
}
ROUNDS = {False: (50, 5), True: (3, 1)}          # ops: (timed, warm-up) by dry run
TRAIN_ROUNDS = {False: (10, 3), True: (2, 0)}    # training steps


def budget(step, dry):
    table = BUDGETS if step in BUDGETS else SUB_BUDGETS
    return table[step][1 if dry else 0]
