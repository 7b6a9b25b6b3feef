"""robustness against the closed form of a linear classifier, the attack's defining properties on small
nonlinear networks, and foolbox's L2DeepFoolAttack where foolbox is installed."""
import pytest
import torch
import torch.nn as nn

import datasets
from robustness import STEP_MARGIN, deepfool, deepfool_robustness, in_pixel_space, sample_indices

OVERSHOOT = 0.02


def linear_model(inputs: int, classes: int, seed: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes)).to(dtype).eval()


def small_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 6)).to(dtype).eval()


def small_convnet(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)).to(dtype).eval()


def random_images(count: int, seed: int, shape=(3, 4, 4), dtype=torch.float64) -> torch.Tensor:
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def predictions(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


def nearest_boundary(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, label: int,
                     classes: list[int]) -> tuple[float, torch.Tensor]:
    """(distance, unit direction) from x to the nearest boundary f_k = f_label of f = W x + b among `classes`."""
    best = None
    for k in classes:
        if k == label:
            continue
        w, b = weight[k] - weight[label], bias[k] - bias[label]
        distance = abs(float(w @ x + b)) / float(w.norm())
        if best is None or distance < best[0]:
            best = (distance, w / w.norm())
    return best


# ---------------------------------------------------------------- closed form: a linear classifier

@pytest.mark.parametrize("classes,seed", [(3, 0), (4, 1), (5, 2)])
def test_linear_classifier_takes_one_step_to_its_nearest_boundary(classes, seed):
    model = linear_model(18, classes, seed)
    x = random_images(12, seed, shape=(2, 3, 3))
    labels = predictions(model, x)
    r = deepfool(model, x, labels, overshoot=OVERSHOOT)
    assert r.shape == x.shape
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    for i in range(len(x)):
        distance, direction = nearest_boundary(weight, bias, x[i].flatten(), int(labels[i]), list(range(classes)))
        expected = (1 + OVERSHOOT) * (distance + STEP_MARGIN) * direction
        torch.testing.assert_close(r[i].flatten(), expected, rtol=1e-10, atol=1e-12)
    assert (predictions(model, x + r) != labels).all()


def test_candidates_limit_the_classes_to_the_top_of_the_clean_logits():
    model = linear_model(18, 5, seed=3)
    x = random_images(20, 3, shape=(18,))
    labels = predictions(model, x)
    with torch.no_grad():
        ranked = model(x).argsort(dim=1, descending=True)
    r = deepfool(model, x, labels, overshoot=OVERSHOOT, candidates=2)
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    for i in range(len(x)):
        runner_up = int(ranked[i, 1])
        distance, direction = nearest_boundary(weight, bias, x[i], int(labels[i]), [runner_up])
        torch.testing.assert_close(r[i], (1 + OVERSHOOT) * (distance + STEP_MARGIN) * direction,
                                   rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- nonlinear networks

def test_every_flipped_sample_is_misclassified_and_misclassified_ones_do_not_move():
    model = small_mlp()
    x = random_images(40, 4)
    labels = predictions(model, x)
    labels[:5] = (labels[:5] + 1) % 6  # misclassified from the start
    r = deepfool(model, x, labels, overshoot=OVERSHOOT)
    assert (r[:5] == 0).all()
    flipped = predictions(model, x + r) != labels
    assert flipped.all(), f"{int((~flipped).sum())} of {len(x)} samples unflipped after 50 steps"
    assert (r[5:].flatten(1).norm(dim=1) > 0).all()


def test_a_flipped_sample_is_not_moved_by_further_iterations():
    model = small_mlp(seed=1)
    x = random_images(40, 5)
    labels = predictions(model, x)
    short = deepfool(model, x, labels, max_iter=2)
    long = deepfool(model, x, labels, max_iter=50)
    done = predictions(model, x + short) != labels
    assert 0 < int(done.sum()) < len(x)  # some samples need more than two steps
    assert torch.equal(short[done], long[done])
    assert not torch.equal(short[~done], long[~done])


def test_no_iteration_leaves_every_sample_unperturbed_and_unflipped():
    model = small_convnet()
    images = torch.randint(0, 256, (8, 3, 8, 8), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    labels = torch.zeros(8, dtype=torch.int64)
    x = images.float() / 255
    assert torch.equal(deepfool(model, x, predictions(model, x), max_iter=0), torch.zeros_like(x))
    metrics = deepfool_robustness(model, images, labels, mean=[0.5] * 3, std=[0.25] * 3, max_iter=0)
    assert metrics["deepfool_unflipped"] == 1.0


def test_permuting_the_batch_permutes_the_perturbations():
    model = small_mlp(seed=2)
    x = random_images(30, 7)
    labels = predictions(model, x)
    r = deepfool(model, x, labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(deepfool(model, x[order], labels[order]), r[order], rtol=1e-9, atol=1e-12)


def test_a_samples_perturbation_does_not_depend_on_the_rest_of_its_batch():
    model = small_mlp(seed=3)
    x = random_images(12, 8)
    labels = predictions(model, x)
    together = deepfool(model, x, labels)
    for i in (0, 5, 11):
        torch.testing.assert_close(deepfool(model, x[i:i + 1], labels[i:i + 1])[0], together[i], rtol=1e-9,
                                   atol=1e-12)
    torch.testing.assert_close(deepfool(model, x[3:9], labels[3:9]), together[3:9], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- robustness in pixel space

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def test_pixel_space_model_gives_the_evaluations_logits():
    model = small_convnet(seed=1)
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(in_pixel_space(model, MEAN, STD)(images.float() / 255),
                           model(datasets.normalize(images, MEAN, STD)))


def test_robustness_of_a_linear_classifier_in_pixel_space_is_its_closed_form():
    # On normalised inputs z = (x - m) / s the classifier W z + b is, on pixels x, W' x + b' with
    # W' = W / s (column by column) and b' = b - W' m: its boundaries in pixel space are known exactly.
    model = linear_model(48, 4, seed=5, dtype=torch.float32)
    images = torch.randint(0, 256, (30, 3, 4, 4), generator=torch.Generator().manual_seed(10), dtype=torch.uint8)
    labels = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(11))
    scale = torch.tensor(STD, dtype=torch.float64).repeat_interleave(16)
    shift = torch.tensor(MEAN, dtype=torch.float64).repeat_interleave(16)
    weight = model[1].weight.detach().double() / scale
    bias = model[1].bias.detach().double() - weight @ shift
    x = images.flatten(1).double() / 255
    decisions = (x @ weight.T + bias).argmax(dim=1)
    ratios = [(1 + OVERSHOOT) * (nearest_boundary(weight, bias, x[i], int(decisions[i]), list(range(4)))[0]
                                 + STEP_MARGIN) / float(x[i].norm()) for i in range(len(x))]
    metrics = deepfool_robustness(model, images, labels, mean=MEAN, std=STD, overshoot=OVERSHOOT, batch_size=7)
    assert metrics["deepfool_robustness"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert metrics["deepfool_unflipped"] == 0.0
    assert metrics["deepfool_steps"] == 1.0
    assert metrics["deepfool_clean_error"] == pytest.approx(float((decisions != labels).double().mean()))


def test_sample_indices_are_distinct_sorted_and_the_same_for_a_seed():
    picked = sample_indices(10000, 100, seed=0)
    assert picked.dtype == torch.int64 and len(picked) == 100
    assert len(picked.unique()) == 100 and (picked.diff() > 0).all()
    assert 0 <= int(picked.min()) and int(picked.max()) < 10000
    assert torch.equal(picked, sample_indices(10000, 100, seed=0))
    assert not torch.equal(picked, sample_indices(10000, 100, seed=1))
    assert torch.equal(sample_indices(7, 7, seed=3), torch.arange(7))
    with pytest.raises(ValueError):
        sample_indices(10, 11, seed=0)


# ---------------------------------------------------------------- the model is left as it was

def test_the_attack_changes_no_parameter_buffer_or_grad_even_under_inference_mode():
    model = small_convnet(seed=2)
    with torch.no_grad():  # running statistics that are not the initial 0 and 1
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.randint(0, 256, (10, 3, 8, 8), generator=torch.Generator().manual_seed(12), dtype=torch.uint8)
    labels = torch.randint(0, 10, (10,), generator=torch.Generator().manual_seed(13))
    with torch.inference_mode():
        metrics = deepfool_robustness(model, images, labels, mean=MEAN, std=STD)
    x = images.float() / 255
    r = deepfool(in_pixel_space(model, MEAN, STD), x, predictions(in_pixel_space(model, MEAN, STD), x))
    assert metrics["deepfool_unflipped"] == 0.0 and metrics["deepfool_robustness"] > 0
    assert r.abs().sum() > 0 and not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(parameter.grad is None for parameter in model.parameters())


def test_a_model_in_training_mode_is_refused():
    model = small_convnet().train()
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="eval"):
        deepfool_robustness(model, images, torch.zeros(2, dtype=torch.int64), mean=MEAN, std=STD)


# ---------------------------------------------------------------- foolbox's L2DeepFoolAttack

def test_matches_foolbox_l2_deepfool():
    # foolbox 3 takes the same steps: the top `candidates` classes of the clean logits, the logit gaps
    # to the top class (loss="logits"), a step of (distance + 1e-4) along the gap's gradient, the model
    # evaluated at x0 + (1 + overshoot) * (sum of the steps). It clips to the model's bounds, made here
    # wide enough never to bind, and adds 1e-8 to the gradient norms of both its divisions (ours floors
    # them at 1e-12 instead), which moves each step by about 1e-8 / ||gradient|| relative: without those
    # 1e-8 the two agree to float64 rounding. Labels are the model's decisions, its top class for foolbox.
    fb = pytest.importorskip("foolbox")
    from foolbox.devutils import atleast_kd, flatten

    class WithoutEpsilon(fb.attacks.L2DeepFoolAttack):
        def get_distances(self, losses, grads):
            return abs(losses) / flatten(grads, keep=2).norms.l2(axis=-1)

        def get_perturbations(self, distances, grads):
            return atleast_kd(distances / flatten(grads).norms.l2(axis=-1), grads.ndim) * grads

    model = small_mlp(seed=4)
    x = random_images(64, 14)
    labels = predictions(model, x)
    fmodel = fb.PyTorchModel(model, bounds=(-1e3, 1e3))
    criterion = fb.criteria.Misclassification(labels)
    ours = deepfool(model, x, labels, overshoot=OVERSHOOT, max_iter=50, candidates=4)
    assert ours.flatten(1).norm(dim=1).min() > 1e-4  # far above the epsilons
    exact = WithoutEpsilon(steps=50, candidates=4, overshoot=OVERSHOOT, loss="logits").run(fmodel, x, criterion)
    torch.testing.assert_close(ours, exact - x, rtol=1e-12, atol=1e-14)
    stock = fb.attacks.L2DeepFoolAttack(steps=50, candidates=4, overshoot=OVERSHOOT, loss="logits")
    theirs = stock.run(fmodel, x, criterion) - x
    torch.testing.assert_close(ours.flatten(1).norm(dim=1), theirs.flatten(1).norm(dim=1), rtol=1e-6, atol=0)
