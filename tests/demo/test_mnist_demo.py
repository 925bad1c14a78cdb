"""The main job end to end at a tiny size: several methods and seeds, two at a time, one table."""
import torch

from ofakd_fast.demo import mnist
from ofakd_fast.train import create_model
from ofakd_fast.train.checkpoint import save_checkpoint


def test_main_job_prints_mean_and_spread_over_seeds(tmp_path, capsys):
    kwargs = {"channels": (16, 32, 64, 128), "stem_width": 16}
    teacher = create_model(mnist.TEACHER_MODEL, kwargs, 10, 1, 28, "--teacher")
    save_checkpoint({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    opts = mnist.build_parser().parse_args([
        "--output", str(tmp_path / "runs"), "--teacher-checkpoint", str(tmp_path / "teacher.pth"),
        "--train-subset", "20", "--epochs", "1", "--batch-size", "10", "--distillers", "vanilla", "ofa",
        "--seeds", "0", "1", "--parallel", "2"])
    result = mnist.run(opts)
    assert list(result["rows"]) == ["vanilla", "ofa"] and all(len(r) == 2 for r in result["rows"].values())
    out = capsys.readouterr().out
    table = out[out.index("MNIST test set"):]
    assert "seeds 0 1" in table and "top-1 % (mean ± std)" in table
    for method, runs in result["rows"].items():
        line = next(row for row in table.splitlines() if row.startswith(method))
        assert " ± " in line and all(f"{r['final_top1']:.2f}" in line for r in runs)
    assert (tmp_path / "runs" / "ofa-seed1" / "last.pth").is_file()
    assert torch.load(tmp_path / "runs" / "ofa-seed1" / "last.pth", weights_only=True)["args"]["seed"] == 1


def test_students_see_whole_digits_and_the_teacher_mild_crops(tmp_path):
    """The design the README's table rests on: uncropped students, a teacher trained with crops."""
    from ofakd_fast.train import parse_args

    opts = mnist.build_parser().parse_args([])
    student = parse_args(mnist.student_argv(opts, "ofa", 1, str(tmp_path / "t.pth"), tmp_path / "s"))
    teacher = parse_args(mnist.teacher_argv(opts, tmp_path / "t"))
    assert (tuple(student.scale), tuple(student.ratio), student.seed) == ((1.0, 1.0), (1.0, 1.0), 1)
    assert (tuple(teacher.scale), tuple(teacher.ratio)) == ((0.6, 1.0), (0.8, 1.25))
    assert student.train_subset == 3000 and student.epochs == 10 and teacher.train_subset == 0


def test_student_flags_override_the_jobs_own(tmp_path):
    from ofakd_fast.train import parse_args

    opts = mnist.build_parser().parse_args(["--student-flags", "--lr 1e-3 --scale 0.6 1"])
    student = parse_args(mnist.student_argv(opts, "kd", 0, str(tmp_path / "t.pth"), tmp_path / "s"))
    assert student.lr == 1e-3 and tuple(student.scale) == (0.6, 1.0) and tuple(student.ratio) == (1.0, 1.0)
