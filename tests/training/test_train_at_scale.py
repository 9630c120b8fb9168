"""Training at scale on the CPU: bf16 + compile + accumulation + clipping + workers + TensorBoard through the real
tokenizer script; accumulation equals one big batch; restarted codes get fresh optimizer moments."""
import json

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import movq_deploy.training.tokenizer as tokenizer
from movq_deploy.models.movq import MoVQConfig
from movq_deploy.training.data import embedded_data


def args_for(out, *extra):
    return tokenizer.build_parser().parse_args(
        ["--out", str(out), "--steps", "2", "--batch-size", "2", "--log-every", "1", "--eval-every", "2",
         "--save-every", "2", "--quiet", "--device", "cpu", *extra])


def test_bf16_compiled_accumulated_clipped_run_with_workers_and_tensorboard(tmp_path, capsys):
    # aot_eager: dynamo and AOT autograd for real, without inductor's C++ build (minutes on this shared CPU).
    result = tokenizer.train(args_for(tmp_path / "run", "--precision", "bf16", "--compile", "--compile-backend",
                                      "aot_eager", "--grad-accum", "2", "--clip-grad", "1.0", "--workers", "2",
                                      "--disc-start", "1", "--tensorboard", str(tmp_path / "tb")))
    assert "--compile:" not in capsys.readouterr().err  # compiled, no fallback notice
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics_tokenizer.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for r in train_records:
        assert r["step_s"] > 0 and 0 <= r["data_wait_s"] <= r["step_s"] and 0 <= r["data_wait_share"] <= 1
        assert r["grad_norm"] > 0 and r["d_loss"] >= 0
    assert train_records[1]["d_loss"] > 0  # the discriminator trained at step 2 (disc-start 1)
    assert 0 < result["eval"]["ssim"] < 1 and "eval_ssim" in records[-1]
    assert all(p.dtype == torch.float32 for p in result["model"].parameters())
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"tokenizer/loss", "tokenizer/data_wait_s", "tokenizer/eval_psnr", "tokenizer/eval_ssim",
            "tokenizer/perplexity"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["tokenizer/reconstructions"]


def test_compile_failure_falls_back_and_trains(tmp_path, capsys):
    tokenizer.train(args_for(tmp_path, "--steps", "1", "--compile", "--compile-backend", "no_such_backend",
                             "--workers", "0"))
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--compile:")]
    assert len(notices) == 1 and "no_such_backend" in notices[0]
    assert (tmp_path / "ckpt.pt").is_file()


def test_two_accumulated_micro_batches_equal_one_batch(tmp_path):
    config = MoVQConfig.preset("tiny")
    x, _ = embedded_data(config.image_size).train_set(seed=0).batch(range(4))
    args = args_for(tmp_path, "--perceptual-weight", "0")
    stages = [tokenizer.Stage1.build(args, config, torch.device("cpu"), main=False) for _ in range(2)]
    for stage in stages:
        stage.ready(distributed=False)
    one, _ = stages[0].step([x], step=0)
    two, _ = stages[1].step([x[:2], x[2:]], step=0)
    assert abs(float(one["loss"]) - float(two["loss"])) < 1e-5
    for a, b in zip(stages[0].model.parameters(), stages[1].model.parameters()):  # the gradients Adam stepped on
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_restarted_codes_reset_their_optimizer_moments():
    codebook = torch.nn.Parameter(torch.randn(6, 4))
    opt = torch.optim.AdamW([codebook], lr=0.1)
    codebook.grad = torch.randn(6, 4)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[codebook].items() if torch.is_tensor(v) and v.dim() == 2}
    counts = torch.tensor([3, 0, 1, 0, 2, 5])  # codes 1 and 3 are dead
    z = torch.randn(2, 8, 2, 2)  # (B, n_z = 2 chunks x 4, h, w)
    restarted = tokenizer.restart_dead_codes(codebook, counts, z, torch.Generator().manual_seed(0), opt)
    assert restarted == 2 and set(before) == {"exp_avg", "exp_avg_sq"}
    for name, old in before.items():
        new = opt.state[codebook][name]
        assert torch.equal(new[[1, 3]], torch.zeros(2, 4)) and old[[1, 3]].abs().sum() > 0
        assert torch.equal(new[[0, 2, 4, 5]], old[[0, 2, 4, 5]])  # the other rows keep their moments


def test_prior_bf16_compiled_accumulated_with_tensorboard_samples(tmp_path):
    import movq_deploy.training.prior as prior_train
    from movq_deploy.models.checkpoint import save_checkpoint
    from movq_deploy.models.movq import MoVQ

    torch.manual_seed(0)
    movq = MoVQ(MoVQConfig.preset("tiny"))
    save_checkpoint(tmp_path / "ckpt.pt", tokenizer_config=movq.config.to_dict(), tokenizer=movq.state_dict(),
                    record={"tokenizer": {"step": 0, "data": {"source": "skimage.data"}}})
    args = prior_train.build_parser().parse_args(
        ["--ckpt", str(tmp_path / "ckpt.pt"), "--steps", "2", "--batch-size", "4", "--num-crops", "16",
         "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--quiet", "--device", "cpu",
         "--precision", "bf16", "--compile", "--compile-backend", "aot_eager", "--grad-accum", "2",
         "--tensorboard", str(tmp_path / "tb")])
    assert args.clip_grad == 1.0  # MaskGIT's clipping is the prior's default
    result = prior_train.train(args)
    records = [json.loads(line) for line in (tmp_path / "metrics_prior.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2] and all(r["grad_norm"] > 0 for r in records[:2])
    assert all(p.dtype == torch.float32 for p in result["prior"].parameters())
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"prior/loss", "prior/eval_masked_accuracy"} <= set(events.Tags()["scalars"])
    samples = events.Images("prior/samples")[0]
    assert (samples.width, samples.height) == (8 * 64, 2 * 64)
