"""movq_deploy.sampling: schedule, seeded noise, re-mask choice and the decoding loop, with a numpy toy prior."""
import math

import numpy as np
import pytest

from movq_deploy import sampling

K, N = 7, 24  # codebook size (mask id = K) and slots: a 2x3 grid with c = 4


_rng = np.random.default_rng(123)
TOY_EMBED, TOY_POSITION, TOY_CLASSES = _rng.normal(size=(K + 1, K)), _rng.normal(size=(N, K)), _rng.normal(size=(3, K))


def toy_logits(tokens, class_labels):
    """A fixed random 'model' whose logits depend on every token (and on the class, None = no class)."""
    embed, position, classes = TOY_EMBED, TOY_POSITION, TOY_CLASSES
    context = embed[tokens].mean(axis=1, keepdims=True)  # (B, 1, K): every slot sees every other slot
    logits = embed[tokens] + position + 2.0 * context
    if class_labels is not None:
        logits = logits + 3.0 * classes[class_labels][:, None]
    return logits


def toy_step(tokens, class_labels, uniform, gumbel, temperature, choice_scale, guidance_scale=0.0):
    """A StepFn with the prior-step graphs' semantics on the toy model (guided rows: cond + w * (cond - uncond))."""
    logits = toy_logits(tokens, class_labels)
    if np.any(guidance_scale):
        guidance = np.broadcast_to(guidance_scale, (len(tokens),))[:, None, None]
        logits = logits + guidance * (logits - toy_logits(tokens, None))
    logits = logits / temperature[:, None, None]  # per image
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    drawn = np.minimum((cdf < uniform[..., None] * cdf[..., -1:]).sum(-1), K - 1)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs = log_probs - np.log(np.exp(log_probs).sum(-1, keepdims=True))
    confidence = np.take_along_axis(log_probs, drawn[..., None], -1)[..., 0] + choice_scale[:, None] * gumbel
    known = tokens != K
    return (np.where(known, tokens, drawn).astype(np.int32),
            np.where(known, np.inf, confidence).astype(np.float32))


class Recorder:
    """Wraps a StepFn and keeps the tokens it was called with."""

    def __init__(self, step_fn=toy_step):
        self.step_fn, self.calls = step_fn, []

    def __call__(self, tokens, *args):
        self.calls.append(tokens.copy())
        return self.step_fn(tokens, *args)


# ---- schedule ------------------------------------------------------------------------------------------------------

def test_remask_counts_follow_maskgit_cosine_schedule():
    counts = sampling.remask_counts(256, 8)
    expected = [math.floor(256 * math.cos(math.pi / 2 * (t + 1) / 8)) for t in range(7)] + [0]
    assert counts.tolist() == expected == [251, 236, 212, 181, 142, 97, 49, 0]


@pytest.mark.parametrize("num_masked,steps", [(1, 8), (2, 8), (5, 12), (24, 8), (256, 8), (1024, 12), (3, 1)])
def test_remask_counts_properties(num_masked, steps):
    counts = sampling.remask_counts(num_masked, steps)
    assert counts.shape == (steps,) and counts[-1] == 0
    unknown = num_masked
    for n in counts[:-1]:
        assert 1 <= n  # something is left for the next step
        assert n <= max(unknown - 1, 1)  # at least one slot is fixed per step while more than one is unknown
        unknown = n


def test_remask_counts_edge_cases():
    assert sampling.remask_counts(0, 8).tolist() == [0] * 8
    assert sampling.remask_counts(1, 4).tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="steps"):
        sampling.remask_counts(10, 0)
    with pytest.raises(ValueError, match="num_masked"):
        sampling.remask_counts(-1, 8)


def test_choice_scale_decays_linearly_to_zero():
    scales = [sampling.choice_scale(t, 8, 4.5) for t in range(8)]
    assert scales[0] == pytest.approx(4.5 * 7 / 8) and scales[-1] == 0.0
    assert np.allclose(np.diff(scales), -4.5 / 8)


# ---- noise ---------------------------------------------------------------------------------------------------------

def test_noise_depends_only_on_seed_and_image_index():
    uniform, gumbel = sampling.draw_noise(5, [0, 1, 2, 3], steps=4, num_slots=N)
    assert uniform.shape == gumbel.shape == (4, 4, N) and uniform.dtype == gumbel.dtype == np.float32
    assert uniform.min() >= 0.0 and uniform.max() < 1.0
    u2, g2 = sampling.draw_noise(5, [3, 1], steps=4, num_slots=N)
    np.testing.assert_array_equal(u2, uniform[[3, 1]])
    np.testing.assert_array_equal(g2, gumbel[[3, 1]])
    u3, _ = sampling.draw_noise(6, [0], steps=4, num_slots=N)
    assert not np.array_equal(u3[0], uniform[0])
    assert not np.array_equal(uniform[0], uniform[1])


# ---- re-mask choice ------------------------------------------------------------------------------------------------

def test_select_remask_picks_lowest_confidence_with_ties_to_lower_slot():
    confidence = np.array([[0.5, -1.0, np.inf, -1.0, 2.0], [np.inf, np.inf, 0.0, 1.0, -3.0]], np.float32)
    chosen = sampling.select_remask(confidence, np.array([2, 1]))
    assert chosen.tolist() == [[False, True, False, True, False], [False, False, False, False, True]]
    chosen = sampling.select_remask(confidence, np.array([1, 3]))
    assert chosen.tolist() == [[False, True, False, False, False], [False, False, True, True, True]]
    assert sampling.select_remask(confidence, np.array([0, 0])).sum() == 0


# ---- decoding loop -------------------------------------------------------------------------------------------------

def test_unmask_masks_exactly_the_scheduled_number_and_keeps_known_tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, K, size=(3, N)).astype(np.int32)
    masked = np.zeros((3, N), bool)
    masked[0] = True
    masked[1, :10] = True
    masked[2, ::5] = True
    start = np.where(masked, K, tokens).astype(np.int32)
    steps = 6
    uniform, gumbel = sampling.draw_noise(0, [0, 1, 2], steps, N)
    recorder = Recorder()
    out = sampling.unmask(recorder, start, K, uniform, gumbel)
    assert len(recorder.calls) == steps
    assert out.dtype == np.int32 and (out != K).all() and (out < K).all()
    np.testing.assert_array_equal(out[~masked], tokens[~masked])
    for row in range(3):
        schedule = sampling.remask_counts(int(masked[row].sum()), steps)
        seen = [int((call[row] == K).sum()) for call in recorder.calls]
        assert seen == [masked[row].sum(), *schedule[:-1]]
        for call in recorder.calls:  # known tokens never change, and only once-masked slots are ever masked
            np.testing.assert_array_equal(call[row][~masked[row]], tokens[row][~masked[row]])
        for before, after in zip(recorder.calls, recorder.calls[1:]):
            fixed = before[row] != K  # a slot, once known, keeps its token
            np.testing.assert_array_equal(after[row][fixed], before[row][fixed])


def test_sample_tokens_same_seed_same_tokens_and_different_seed_differs():
    a = sampling.sample_tokens(toy_step, 4, N, K, steps=5, seed=11)
    b = sampling.sample_tokens(toy_step, 4, N, K, steps=5, seed=11)
    c = sampling.sample_tokens(toy_step, 4, N, K, steps=5, seed=12)
    assert a.shape == (4, N) and a.dtype == np.int32 and (a < K).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_tokens_does_not_depend_on_batching():
    six = sampling.sample_tokens(toy_step, 6, N, K, steps=5, seed=3)
    first = sampling.sample_tokens(toy_step, 3, N, K, steps=5, seed=3)
    next_three = sampling.sample_tokens(toy_step, 3, N, K, steps=5, seed=3, first_index=3)
    np.testing.assert_array_equal(six, np.concatenate([first, next_three]))
    for max_batch in (1, 4):
        recorder = Recorder()
        chunked = sampling.sample_tokens(recorder, 6, N, K, steps=5, seed=3, max_batch=max_batch)
        np.testing.assert_array_equal(chunked, six)
        assert max(len(call) for call in recorder.calls) == max_batch


def test_class_labels_change_the_output():
    labels_a, labels_b = np.zeros(4, np.int32), np.full(4, 2, np.int32)
    a = sampling.sample_tokens(toy_step, 4, N, K, steps=4, seed=0, class_labels=labels_a)
    b = sampling.sample_tokens(toy_step, 4, N, K, steps=4, seed=0, class_labels=labels_b)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="class_labels"):
        sampling.sample_tokens(toy_step, 4, N, K, class_labels=labels_a[:3])


def test_guidance_scale_reaches_the_step_per_row_and_changes_tokens():
    labels = np.array([0, 1, 2, 0], np.int32)
    recorder = Recorder()
    plain = sampling.sample_tokens(toy_step, 4, N, K, steps=4, seed=5, class_labels=labels)
    zero = sampling.sample_tokens(recorder, 4, N, K, steps=4, seed=5, class_labels=labels, guidance_scale=0.0)
    np.testing.assert_array_equal(zero, plain)  # w = 0: exactly the unguided tokens
    mixed = sampling.sample_tokens(toy_step, 4, N, K, steps=4, seed=5, class_labels=labels,
                                   guidance_scale=[0.0, 3.0, 0.0, 3.0])
    np.testing.assert_array_equal(mixed[[0, 2]], plain[[0, 2]])
    assert not np.array_equal(mixed[[1, 3]], plain[[1, 3]])  # guidance changes the guided rows only
    for row in (1, 3):  # ... and a guided row does not depend on the rows beside it
        alone = sampling.sample_tokens(toy_step, 1, N, K, steps=4, seed=5, class_labels=labels[row:row + 1],
                                       guidance_scale=3.0, first_index=row)
        np.testing.assert_array_equal(alone[0], mixed[row])


@pytest.mark.parametrize("value,message", [
    (-1.0, "guidance_scale must be >= 0"), (float("nan"), "guidance_scale must be a finite number >= 0"),
    (float("inf"), "guidance_scale must be a finite number"), ("3", "guidance_scale must be a finite number"),
    (True, "guidance_scale must be a finite number"), ([1.0, 2.0], "guidance_scale must be one number or 3"),
])
def test_bad_guidance_scale_is_a_one_line_value_error(value, message):
    with pytest.raises(ValueError, match=message) as info:
        sampling.check_options(3, guidance_scale=value, num_classes=2)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="guidance_scale"):
        sampling.sample_tokens(toy_step, 3, N, K, guidance_scale=value)


def test_check_options_guidance_defaults_and_refusal():
    assert sampling.check_options(2, num_classes=2).guidance_scale == 0.0
    defaults = sampling.SamplingDefaults(guidance_scale=2.5)
    assert sampling.check_options(2, num_classes=2, defaults=defaults).guidance_scale == 2.5
    assert sampling.check_options(2, guidance_scale=[0, 1.5], num_classes=2).guidance_scale.tolist() == [0, 1.5]
    why = "this model is unconditional"
    assert sampling.check_options(2, guidance_scale=0, no_guidance=why).guidance_scale == 0.0  # w = 0 always works
    with pytest.raises(ValueError, match=f"guidance_scale must be 0 here: {why}"):
        sampling.check_options(2, guidance_scale=[0, 1.0], no_guidance=why)


def test_resolve_class_labels():
    assert sampling.resolve_class_labels(None, 3, 0) is None
    assert sampling.resolve_class_labels(None, 3, 5).tolist() == [5, 5, 5]  # the null class
    assert sampling.resolve_class_labels(2, 3, 5).tolist() == [2, 2, 2]
    assert sampling.resolve_class_labels([0, 1, 4], 3, 5).dtype == np.int32
    with pytest.raises(ValueError, match="unconditional"):
        sampling.resolve_class_labels([0, 1, 2], 3, 0)
    with pytest.raises(ValueError, match="lie in"):
        sampling.resolve_class_labels([0, 6, 1], 3, 5)
    with pytest.raises(ValueError, match="3 ints"):
        sampling.resolve_class_labels([0, 1], 3, 5)


# ---- editing -------------------------------------------------------------------------------------------------------

def test_edit_keeps_unmasked_slots_and_regenerates_masked_ones():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, K, size=(4, N)).astype(np.int32)
    slot_mask = rng.random((4, N)) < 0.4
    slot_mask[3] = False
    recorder = Recorder()
    out = sampling.edit_tokens(recorder, tokens, slot_mask, K, steps=4, seed=9)
    np.testing.assert_array_equal(out[~slot_mask], tokens[~slot_mask])
    assert (out < K).all()
    np.testing.assert_array_equal(out[3], tokens[3])
    assert all(len(call) == 3 for call in recorder.calls)  # the untouched image never reaches the prior
    # Image i uses stream (seed, i) whatever else is in the batch.
    alone = sampling.edit_tokens(toy_step, tokens[2:3], slot_mask[2:3], K, steps=4, seed=9, first_index=2)
    np.testing.assert_array_equal(alone[0], out[2])


def test_all_masked_edit_equals_sample_and_empty_mask_returns_input():
    tokens = np.random.default_rng(2).integers(0, K, size=(3, N)).astype(np.int32)
    edited = sampling.edit_tokens(toy_step, tokens, np.ones((3, N), bool), K, steps=5, seed=4)
    np.testing.assert_array_equal(edited, sampling.sample_tokens(toy_step, 3, N, K, steps=5, seed=4))
    recorder = Recorder()
    same = sampling.edit_tokens(recorder, tokens, np.zeros((3, N), bool), K, steps=5, seed=4)
    np.testing.assert_array_equal(same, tokens)
    assert recorder.calls == []


def test_edit_rejects_bad_input():
    tokens = np.zeros((2, N), np.int32)
    with pytest.raises(ValueError, match="slot_mask"):
        sampling.edit_tokens(toy_step, tokens, np.ones((2, N - 1), bool), K)
    with pytest.raises(ValueError, match="slot_mask"):
        sampling.edit_tokens(toy_step, tokens, np.ones((2, N), np.uint8), K)
    with pytest.raises(ValueError, match="known tokens"):
        sampling.edit_tokens(toy_step, tokens + K, np.zeros((2, N), bool), K)
    with pytest.raises(ValueError, match="temperature"):
        sampling.sample_tokens(toy_step, 2, N, K, temperature=0.0)
    with pytest.raises(ValueError, match="seed"):
        sampling.sample_tokens(toy_step, 2, N, K, seed=-1)


def test_slot_mask_from_pixels_cell_rule():
    grid = (2, 3, 4)  # h, w, c; 8x12 pixels -> 4x4-pixel cells
    masks = np.zeros((2, 8, 12), bool)
    masks[0, 5, 9] = True  # one pixel in the cell of position (1, 2)
    masks[1, 0:4, 4:8] = True  # exactly the cell of position (0, 1)
    slots = sampling.slot_mask_from_pixels(masks, grid)
    assert slots.shape == (2, 24) and slots.dtype == bool
    expected = np.zeros((2, 2, 3, 4), bool)
    expected[0, 1, 2, :] = True  # all c slots of the position
    expected[1, 0, 1, :] = True
    np.testing.assert_array_equal(slots, expected.reshape(2, 24))
    assert sampling.slot_mask_from_pixels(np.ones((1, 8, 12), bool), grid).all()
    with pytest.raises(ValueError, match="multiple"):
        sampling.slot_mask_from_pixels(np.ones((1, 9, 12), bool), grid)
    with pytest.raises(ValueError, match="bool"):
        sampling.slot_mask_from_pixels(np.ones((1, 8, 12), np.uint8), grid)
