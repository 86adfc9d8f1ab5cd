"""Flags and paths the tests of both stages share, on the tiny benchmark (12 LAION images, B = 20, T = 5)."""

STAGE1 = ["--laion_subset_size", "12", "--batch_size", "20", "--time_samples", "5", "--device", "cpu"]


def stage2_flags(steps: int = 3, accum: int = 2, batch: int = 4, n: int = 1000):
    """Stage 2 with the stage-1 layout above and a short unlearning schedule (N: --fisher_dataset_size)."""
    return ["--laion_subset_size", "12", "--loss_batch_size", "20", "--loss_time_samples", "5", "--device", "cpu",
            "--unlearn_steps", str(steps), "--unlearn_grad_accum_steps", str(accum), "--unlearn_batch_size",
            str(batch), "--fisher_dataset_size", str(n)]


def paths(bench, results):
    return ["--sd_version", bench["sd_version"], "--dataroot", bench["dataroot"], "--task_json", bench["task_json"],
            "--result_dir", str(results)]


def stage1_cache(bench, results) -> str:
    """Stage 1 of the tiny benchmark into <results>/orig_loss; returns that folder (for --loss_cache_dir)."""
    import compute_training_loss

    compute_training_loss.main(paths(bench, results) + STAGE1)
    return str(results / "orig_loss")
