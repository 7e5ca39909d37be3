"""Plug-ins by name (fluxguide/plugins.py, docs/design.md "Plug-ins"): wherever a reward, a policy architecture, a
backbone or a prompt set is named, a ``package.module:attribute`` spec works, an installed package registers
names through its entry points, and a bad spec gets an error naming what failed to import.

The "installed package" is a real distribution: a package folder and a ``*.dist-info`` folder with
``entry_points.txt``, on ``sys.path`` (where ``importlib.metadata`` finds installed distributions).
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import gymnasium
import pytest
import torch
from torch import nn

import fluxguide.envs  # noqa: F401 - registers fluxguide/Shapes-v0
from fluxguide.backbones.base import Backbone
from fluxguide.backbones.registry import BACKBONES, build_backbone
from fluxguide.envs import GuidanceCore, resolve_prompts
from fluxguide.plugins import PluginError, Registry, load_spec
from fluxguide.policies.registry import POLICIES, build_policy
from fluxguide.rewards import available_rewards, make_reward

PKG = "fluxguide_test_plugin_pkg"

MODULES = {
    "rewards.py": '''
        import torch
        from fluxguide.rewards import CallableReward

        def brightness(images, prompts):
            return images.mean(dim=(1, 2, 3))

        def make(scale=1.0):
            return CallableReward(lambda images, prompts: scale * brightness(images, prompts))
    ''',
    "policies.py": '''
        import torch
        from torch import nn

        from fluxguide.policies import BaseGuidanceModel

        class ScaledPred(BaseGuidanceModel):
            """A one-parameter guidance network: ``w * pred`` (zero at initialisation)."""

            def __init__(self, device=None):
                super().__init__()
                self.register_config()  # no constructor arguments to record: the class name rebuilds it
                self.w = nn.Parameter(torch.zeros((), device=device))

            def forward(self, img, pred, txt, vec, timestep, step_idx):
                return self.w * pred

        def make(backbone, *, device):
            return ScaledPred(device)
    ''',
    "backbones.py": '''
        from fluxguide.backbones.registry import build_backbone

        def make(*, seed, device):
            backbone = build_backbone("shapes-random", seed=seed, device=device)
            backbone.built_by_plugin = True
            return backbone
    ''',
    "prompts.py": '''
        def make():
            return ["a red circle", "a blue bar"]
    ''',
}

ENTRY_POINTS = f"""
[fluxguide.rewards]
my-test-reward = {PKG}.rewards:make
broken-reward = {PKG}.not_there:make

[fluxguide.policies]
my-test-policy = {PKG}.policies:make

[fluxguide.backbones]
my-test-backbone = {PKG}.backbones:make

[fluxguide.prompts]
my-test-prompts = {PKG}.prompts:make
"""


@pytest.fixture(scope="module")
def plugin_dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An installed distribution declaring entry points in every fluxguide group, on sys.path."""
    root = tmp_path_factory.mktemp("site")
    pkg = root / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, source in MODULES.items():
        (pkg / name).write_text(textwrap.dedent(source))
    dist = root / "fluxguide_test_plugin-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fluxguide-test-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        importlib.invalidate_caches()
        yield root
    for mod in [m for m in sys.modules if m == PKG or m.startswith(f"{PKG}.")]:
        del sys.modules[mod]
    importlib.invalidate_caches()


def ramp_images() -> torch.Tensor:
    return torch.linspace(0, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)


# ----------------------------------------------------------------------------------------------- specs
def test_reward_spec(plugin_dist: Path) -> None:
    reward = make_reward(f"{PKG}.rewards:make", scale=2.0)
    assert torch.allclose(reward(ramp_images(), ["a", "b"]), 2.0 * ramp_images().mean(dim=(1, 2, 3)))


def test_policy_spec(plugin_dist: Path, shapes_random: Backbone) -> None:
    policy = build_policy(f"{PKG}.policies:make", shapes_random)
    assert type(policy).__name__ == "ScaledPred"
    assert build_policy(f"{PKG}.policies:make", shapes_random, min_t=0.5).__class__.__name__ == "TimestepRangeGuidance"


def test_backbone_spec(plugin_dist: Path) -> None:
    backbone = build_backbone(f"{PKG}.backbones:make", seed=1)
    assert isinstance(backbone, Backbone) and backbone.built_by_plugin


def test_prompt_spec(plugin_dist: Path) -> None:
    assert resolve_prompts(f"{PKG}.prompts:make") == ["a red circle", "a blue bar"]


def test_env_kwargs_take_specs(plugin_dist: Path, shapes_random: Backbone) -> None:
    core = GuidanceCore(shapes_random, reward=f"{PKG}.rewards:make", prompts=f"{PKG}.prompts:make", batch_size=2,
                        num_steps=2)
    assert core.prompt_source.prompts == ["a red circle", "a blue bar"]
    core.reset(seed=0)
    zero = torch.zeros(2, *core.latent_shape)
    core.step(zero)
    result = core.step(zero)
    assert result.terminated
    assert torch.allclose(result.reward, core.final_images.mean(dim=(1, 2, 3)))


def test_gymnasium_make_takes_a_reward_spec(plugin_dist: Path, shapes_random: Backbone) -> None:
    env = gymnasium.make("fluxguide/Shapes-v0", backbone=shapes_random, reward=f"{PKG}.rewards:make", num_steps=2,
                         prompts="my-test-prompts")
    env.reset(seed=0)
    action = env.action_space.sample() * 0
    env.step(action)
    _, reward, terminated, _, _ = env.step(action)
    assert terminated
    assert reward == pytest.approx(float(env.unwrapped.core.final_images.mean()), rel=1e-5)
    env.close()


# ------------------------------------------------------------------------------------------ entry points
def test_installed_package_registers_a_reward(plugin_dist: Path) -> None:
    assert "my-test-reward" in available_rewards()
    reward = make_reward("my-test-reward")
    assert torch.allclose(reward(ramp_images(), ["a", "b"]), ramp_images().mean(dim=(1, 2, 3)))
    assert make_reward("My_Test_Reward") is not None  # names are case-insensitive, _ = -


def test_installed_package_registers_a_policy(plugin_dist: Path, shapes_random: Backbone) -> None:
    assert "my-test-policy" in POLICIES.names()
    assert type(build_policy("my-test-policy", shapes_random)).__name__ == "ScaledPred"


def test_installed_package_registers_a_backbone(plugin_dist: Path) -> None:
    assert "my-test-backbone" in BACKBONES.names()
    assert build_backbone("my-test-backbone").built_by_plugin


def test_installed_package_registers_a_prompt_set(plugin_dist: Path) -> None:
    assert resolve_prompts("my-test-prompts") == ["a red circle", "a blue bar"]


def test_entry_point_that_fails_to_load_names_it(plugin_dist: Path) -> None:
    with pytest.raises(PluginError, match=rf"broken-reward.*{PKG}\.not_there:make.*fluxguide\.rewards"):
        make_reward("broken-reward")


# --------------------------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize(
    ("build", "kind"),
    [
        (lambda spec, bb: make_reward(spec), "reward"),
        (lambda spec, bb: build_policy(spec, bb), "policy architecture"),
        (lambda spec, bb: build_backbone(spec), "backbone"),
        (lambda spec, bb: resolve_prompts(spec), "prompt set"),
        (lambda spec, bb: GuidanceCore(bb, reward=spec), "reward"),
    ],
    ids=["make_reward", "build_policy", "build_backbone", "prompts", "GuidanceCore"],
)
def test_bad_specs_name_what_failed(plugin_dist: Path, shapes_random: Backbone, build, kind: str) -> None:
    with pytest.raises(PluginError, match=rf"{kind} spec .*could not import module 'no_such_pkg_zz\.sub'"):
        build("no_such_pkg_zz.sub:make", shapes_random)
    with pytest.raises(PluginError, match=rf"'{PKG}\.rewards' has no attribute 'nope'"):
        build(f"{PKG}.rewards:nope", shapes_random)
    with pytest.raises(PluginError, match=rf"'{PKG}\.rewards\.make' has no attribute 'deeper'"):
        build(f"{PKG}.rewards:make.deeper", shapes_random)
    with pytest.raises(PluginError, match="not of the form 'package.module:attribute'"):
        build(f"{PKG}.rewards:", shapes_random)
    with pytest.raises(PluginError, match="not of the form"):
        build(":make", shapes_random)


def test_plugin_error_is_an_import_and_value_error() -> None:
    with pytest.raises(ImportError):
        load_spec("no_such_pkg_zz:make")
    with pytest.raises(ValueError):
        load_spec("no_such_pkg_zz:make")


@pytest.mark.parametrize(
    ("build", "valid"),
    [
        (lambda bb: make_reward("no-such-thing"), ["clip", "shapes-clip", "verifier", "weighted-sum"]),
        (lambda bb: build_policy("no-such-thing", bb), ["attention", "conv", "mlp"]),
        (lambda bb: build_backbone("no-such-thing"), ["flux", "shapes", "shapes-random", "tiny-flux"]),
    ],
    ids=["reward", "policy", "backbone"],
)
def test_unknown_names_list_the_valid_ones(shapes_random: Backbone, build, valid: list[str]) -> None:
    with pytest.raises(PluginError, match="unknown .*'no-such-thing'; valid names: ") as info:
        build(shapes_random)
    assert all(name in str(info.value) for name in valid), str(info.value)
    assert "package.module:attribute" in str(info.value)


def test_unknown_prompt_source_lists_the_prompt_sets() -> None:
    with pytest.raises(ValueError, match="unknown prompt source 'no-such-thing'.*'shapes-heldout', 'shapes-train'"):
        resolve_prompts("no-such-thing")


# ------------------------------------------------------------------------------------------- the registry
def test_registry_in_code() -> None:
    reg: Registry = Registry("widget", "fluxguide.test-widgets")

    @reg.register("My_Widget")
    def make() -> str:
        return "w"

    assert reg.names() == ["my-widget"] and "MY-WIDGET" in reg and reg.get("my_widget") is make
    with pytest.raises(ValueError, match="already registered"):
        reg.register("my-widget", make)
    reg.register("my-widget", nn.Identity, overwrite=True)
    assert reg.get("my-widget") is nn.Identity
    assert "torch.nn:Identity" in reg and reg.get("torch.nn:Identity") is nn.Identity
    with pytest.raises(PluginError, match="unknown widget 'other'; valid names: my-widget"):
        reg.get("other")


# ---------------------------------------------------------------------------------------- name collisions
COLLIDING = "fluxguide_test_colliding_pkg"


@pytest.fixture
def install(tmp_path: Path) -> Iterator[Callable[[str, str], None]]:
    """``install(distribution, entry_points_txt)``: a real installed distribution (a ``*.dist-info`` folder with
    ``entry_points.txt``) on ``sys.path``, whose entry points name factories of one shared package."""
    pkg = tmp_path / COLLIDING
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from fluxguide.rewards import CallableReward

        def make_a(**kwargs):
            return CallableReward(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="from package a")

        def make_b(**kwargs):
            return CallableReward(lambda images, prompts: -images.mean(dim=(1, 2, 3)), name="from package b")
    '''))

    def add(distribution: str, text: str) -> None:
        dist = tmp_path / f"{distribution.replace('-', '_')}-0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.0\n")
        (dist / "entry_points.txt").write_text(textwrap.dedent(text))
        importlib.invalidate_caches()

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        yield add
    for mod in [m for m in sys.modules if m == COLLIDING or m.startswith(f"{COLLIDING}.")]:
        del sys.modules[mod]
    importlib.invalidate_caches()


def test_an_entry_point_named_like_a_built_in_reward_is_ignored_with_a_warning(install) -> None:
    # 'shapes-clip' is fluxguide's own entry point, 'clip' is registered in code: neither is replaced.
    install("fluxguide-test-squatter", f"""
        [fluxguide.rewards]
        shapes-clip = {COLLIDING}:make_a
        CLIP = {COLLIDING}:make_b
    """)
    from fluxguide.rewards.registry import REWARDS

    with pytest.warns(UserWarning, match=rf"(?s)reward 'shapes-clip'.*fluxguide\.worlds\.shapes\.rewards:"
                                         rf"shapes_clip_score.*'{COLLIDING}:make_a'.*fluxguide-test-squatter"):
        factory = REWARDS.get("shapes-clip")
    assert factory.__module__ == "fluxguide.worlds.shapes.rewards"
    with pytest.warns(UserWarning, match=rf"(?s)reward 'clip'.*fluxguide\.rewards\.registry.*'{COLLIDING}:make_b'"):
        factory = REWARDS.get("clip")
    assert factory.__module__ == "fluxguide.rewards.registry"
    assert make_reward(f"{COLLIDING}:make_a").name == "from package a"  # the spec still reaches the other one


def test_two_packages_declaring_one_name_are_refused_naming_both(install) -> None:
    install("fluxguide-test-one", f"[fluxguide.rewards]\nmy-shared-name = {COLLIDING}:make_a\n")
    install("fluxguide-test-two", f"[fluxguide.rewards]\nmy_shared_name = {COLLIDING}:make_b\n")
    with pytest.warns(UserWarning, match="my-shared-name"), pytest.raises(PluginError) as info:
        make_reward("my-shared-name")
    message = str(info.value)
    for part in ("fluxguide-test-one", "fluxguide-test-two", f"'{COLLIDING}:make_a'", f"'{COLLIDING}:make_b'",
                 "spec"):
        assert part in message, message
    assert "my-shared-name" in available_rewards()  # listed, but only reachable by its spec
