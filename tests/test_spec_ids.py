"""Configuration ids: what they hash, that they stay stable (golden values, every shipped spec's ids, fields
added later left out at their defaults) and that they change when any setting does."""
import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import spec as S
from jobs.spec import Configuration, RemovalRule, SpecError, TestPointRule, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "jobs" / "specs").glob("*.yaml"))


def ids(spec):
    return [c.config_id for c in spec.configurations()]


def test_fields_added_later_keep_old_ids():
    # Settings at their defaults are left out of the hashed JSON, so ids stored before they existed still match.
    assert "batch_size" not in Configuration("iris").canonical_json()
    assert Configuration("iris", batch_size=32).config_id != Configuration("iris").config_id


# The Configuration fields of the first release, which stored results: frozen. Any field not listed here was
# added later and must be declared `later(default)`, or every stored config_id changes.
FIRST_RELEASE_FIELDS = (
    "experiment", "dataset", "test_fraction", "split_seed", "model", "depth", "width", "activation", "optimizer",
    "lr", "epochs", "weight_decay", "seed", "methods", "damping", "damping_policy", "solvers", "test_chunk",
    "grad_chunk", "test_points", "removals", "retrain_epochs", "retrain_lr", "controls", "perturbation",
    "retrain_chunk",
)
# The later fields that already exist, with the values they are left out at (what the ids were made with).
LATER_DEFAULTS = {"data_root": None, "subset": None, "test_subset": None, "classes": None, "per_class": None,
                  "image_size": None, "momentum": 0.9, "batch_size": None, "schedule": "constant",
                  "mixed_precision": False, "dtype": "float64", "retrain_start": "warm"}


def test_every_field_added_after_the_first_release_is_declared_later():
    later = {f.name: f.default for f in dataclasses.fields(Configuration) if f.metadata.get("later")}
    undeclared = [name for name in S.FIELDS if name not in FIRST_RELEASE_FIELDS and name not in later]
    assert not undeclared, (
        f"Configuration fields {undeclared} are new but not declared with later(default): as they are, they enter "
        f"the canonical JSON and change every config_id (and model_key) already stored, so no run resumes. "
        f"Declare each as `name: type = later(default)` in jobs/spec.py, with the default that reproduces what "
        f"ran before the field existed.")
    assert not set(later) & set(FIRST_RELEASE_FIELDS), "a field of the first release is always in the canonical JSON"
    assert {k: v for k, v in later.items() if k in LATER_DEFAULTS} == LATER_DEFAULTS, (
        "the default of a later field changed: configurations stored with the old default would change id")
    for name, value in LATER_DEFAULTS.items():
        assert type(later[name]) is type(value), name  # 0.9 stays a float, None stays None


# Every configuration of every shipped spec, as "config_id model_key", computed before ids were declared on the
# fields. Changing the canonical form orphans every stored result: do it only on purpose, and update these.
SHIPPED_IDS = {
    "cifar10-smoke.yaml": (
        "1527f5eec793 d0259d91b72e", "1d247ca9645d 5a6684ddf915",
    ),
    "cifar10.yaml": (
        "07a0d22dd072 33a12153853b", "3888ccb8b51a 88e1511b85ff", "ab726e900d01 16328d713fd0",
        "309905bf1ff4 2ee61be57c01", "35dda7ba59b2 baf4d849a04c",
    ),
    "digits.yaml": (
        "1789a7ce9d4d 4b0f50533fd7", "216f98418d6c 8b4fc9a1d8ae", "5c4ffa980a61 f33f56b3d37f",
        "c83a51b09d61 9c298a28fb09", "65765e061786 5bac349dab71", "18ba9716b432 b0671fcf8766",
        "1cd07bb6e55a e72eb7a39afa", "beece5983c5a 2b744f076ab9", "8d43e3e44134 b07b29615d15",
        "13788605c3b2 cdc68673dfad", "1924ddf7392e e70ae96aef00", "c649e1ee7d36 6d5ea2afbb09",
    ),
    "imagenet-smoke.yaml": (
        "ab157a6b2564 fff84f0abd6e",
    ),
    "imagenet.yaml": (
        "959a9226db38 3b0ac208bbf8",
    ),
    "iris-smoke.yaml": (
        "d4f124c8cbc1 436edf3da876", "0b28d0cb059a 9be3739250bc", "3efce7230362 bae618e187a7",
        "9abab7fc7501 aae6b2151f39",
    ),
    "iris.yaml": (
        "cc28a1b61fc9 acfb16ea6b52", "e80bfd1aff66 0b99d5dcb735", "4b3b180059e1 773476d6af2a", "0bfe9d237f7e a3ce27732195",
        "4bc9892128b1 7ad2669911a9", "32e82c251678 edca4166a5c9", "04b1420039bc 2382ff58cd65", "d973c76429e7 b5058d85a61e",
        "9fb4440f89a8 2428941b3e2c", "8780491c04ac d962c3719689", "8ad9186c2a6b 000517089555", "16bd10a715ba 77573eb74267",
        "af020460b3f7 b885b755c306", "6b4f522dea7e fad7ad571ffa", "69d72e804980 68ee797fec1c", "2a9f61c5445c 68d10e08cc73",
        "c34a672546ee 87fe89e63dc7", "0e4666fd51f3 8b0f0fc80ea8", "2d46ccc6f2c9 8b2bab1291ba", "10f450a5bfd9 f9bac3dacbc0",
        "d12315806a69 9578b7526585", "7ebcac39404d aaa0ae35f594", "9b37192e8423 0c0db922e3ed", "1ad0bde27c26 4f715f23632a",
        "ca04b369dddb 4460eb39f4ee", "062acc584b3d 73c671ae4ff6", "118da5e87a09 f1d78bae06ec", "6de855d3d152 d5d37ab6afc0",
        "7371b1fad938 066da6569a14", "2aee4e3dfe7f 96fff3395e26", "51bb89879026 32d602912705", "dd0907d67dc2 581253d5031f",
        "ec1855355b8a cd9bdb3e2670", "478fc2b1aec2 34799faf5684", "ebba411998ca a6c12a779e9c", "85b23d14a9c3 1b4b6c7ebc51",
        "915e9c3713bf 2b223c6ad290", "471aac6b36ff 39744c9c9395", "0ab67e50195c 7292002ad60d", "91c2b311fa37 6a75390a5f76",
        "b34e6a952d21 72c8dbf11e51", "cf70b104ee85 dd20de0dc2f1", "43bb1b3475a8 d68d79e0a4a9", "4b1e74d8d355 b96efdd60853",
        "68801b84cac1 9e9d60c1c072", "fbd0e1122123 0153e4f533f2", "ab54af995a80 55bc2dd3c8b1", "7e4863313f50 4ca39cbfa829",
        "0f06f3f54fb5 ffb05cf14061", "f8085ecf517f f6671612b5d9", "8976343fb9f8 b271a5701b4c", "34f1c8b6d06b 41be18ace683",
        "c9f61cb700dc 06fde624f734", "e80eb5b71469 5a1078be1a22", "a91a3cb5a9bc d8ed0ce3096b", "4713c41672a8 619e86cae441",
        "5cc4cf59145a cf1d6f533688", "59fdf0e7fd22 38a8553a2bff", "6734f5f251df 7d4778ef8c5d", "e259ce897a7c 8ebcd688b060",
        "e6cd2c6aab28 1820491adb63", "5bc8c2b44e89 83a27e5e8f5d", "f933267349ca b3d2a3e30ffe", "fe02da0b6c4c 54b3c49affab",
        "b24cc092cbc9 b637d6a3107c", "08f9850511e5 c6e91e8be7f4", "b5794be20633 2bb3286cdd44", "a6e78400fa6b 2ea5b731c4c0",
        "8204ed1d21f2 05a5508f4c0f", "74518c251d08 c9bfb0506d35", "49ad00c02986 faa9766b62a6", "92ea2f83daca 0603a9b95257",
        "74673f8313b3 8595a32f6599", "f12231356522 a0cb6363d940", "c61d32ecd8ed efa0a2a94f49", "e208206b731a 4091ed58e4ad",
        "14cfb587b4b1 9b2ccb4ff7d8", "7eb355fcbea7 da36d679ab61", "e310e94df9f4 25bf7ceb3ecb", "6d35929c0edd 10a3dcf9cff9",
        "9fd4dd618dd7 b828b6038cf2", "c2cccfc35b60 aec4224fe056", "fae848499427 f90f4e144ee0", "1cc366aa23a2 7eb04a3fb8da",
        "a40885facaf3 9eff8366859c", "de0fab665b66 4cbac6b65ee1", "a667b25b52cc ca553f163b66", "6d746f807b01 bbede32f316e",
        "80deba4ffc9d 698e1e60a33d", "c0394f159d81 ca160234da84", "09f6b48deca4 a7356ac312f3", "046dd9f6e1fc e9cfa0d16b88",
        "e368df853dd8 de55b22af471", "611aeb1676bb 99bc7163475d", "3706becd5faf 07b6d747cf76", "420b26a32239 0dbc55558f9b",
        "4da0aab9844e 0ed4d82efda2", "270d4cb79d7d 3006bb281ec0", "2992a691ea34 5fe7f0139b88", "2d9d4c4a6f85 b1f40651883c",
        "647b6ea108fe 8d15818a6ccd", "a9c54a958575 58f639a68e0c", "d56addfb9bd0 576ec1b5aafa", "dc0f7ad81ac6 0ab62e8ca266",
        "aa4651e9df78 44c3cc5a9ed5", "b8a0f892de7e 916d0fd314ac", "359b13334411 81342f4f7524", "7a4fba2f1631 00f42e56b1e2",
        "c947b85531c8 d50934f5a6d8", "05ac3158a212 0b71ac74e831", "6a803b93ed96 ee92831d463e", "d58e746d79ab b115ecc945d6",
        "c9fede349c5f 135304a94a29", "cac01143718f b50ee99a673a", "14d0d05da3ab 9f9a2f0b6b60", "5ab6e8f85350 3af89121d191",
        "9fce5a314309 92669a804087", "f9dcf190c9f9 1a264f8b5114", "04071b9f2677 8539ad3a1f28", "574cb50e8f72 d56f08bd30f8",
        "f3575035f299 3c514cce78dd", "b70f8679e983 efcb66b5c4dd", "ea3a4910d834 def26a9b701d", "00a6c592ac1a 7cd14397f137",
        "fb40bdc025cd cadf7fafd3ae", "bc1d087001fc 6ef2ab1dadde", "52b2cade764a 60344593894c", "814cc58b4392 d02719e6d66e",
        "fbf9655ebbd8 454dcd3cabbc", "87dd66a78978 ae9888194184", "70462e053283 994f12b304f5", "abe0b6cf6ef0 78543bfb2d15",
        "2faba9a797d6 087a2a8d962a", "9b65c24e31ff 67886696c9ea", "8b5732b037c5 305a744c1005", "915bd0dc7f96 c4772ddd447f",
        "8d5d9d2097e1 824bd227a983", "b327a9830710 56039c511dd1", "1f8c226159bb ae46645158d3", "2fece3e3448d 6c6430d8aed5",
    ),
    "convex-control.yaml": ("f5b499402ddd 5a15ffc8bccb",),
    "iris-truths.yaml": (
        "41049c640fc3 acfb16ea6b52", "12fcfc83e439 edca4166a5c9", "0a4296973d9d 32d602912705", "31e39f8c6387 1b4b6c7ebc51",
        "44cc26af3788 faa9766b62a6", "7f0a3a026a72 4091ed58e4ad", "419d49df2911 38db48f4f3bd", "a5a08ee8c3bd acfb16ea6b52",
        "a335b47ae38f edca4166a5c9", "cc1a15e6ead0 32d602912705", "57121936dd4a 1b4b6c7ebc51", "ffb2689c753d faa9766b62a6",
        "6526f6f7acbc 4091ed58e4ad", "896cc91d5248 38db48f4f3bd", "8a7222c89e1c acfb16ea6b52", "6783f216b1c6 edca4166a5c9",
        "8ad083e2b6c9 32d602912705", "4aa63eeb0e90 1b4b6c7ebc51", "7967b5fbf7be faa9766b62a6", "b41ea9197792 4091ed58e4ad",
        "d25527fec088 38db48f4f3bd", "05b464adae1d acfb16ea6b52", "dda35c1b5445 edca4166a5c9", "7e0ea80ebd1b 32d602912705",
        "d145fde0bfe8 1b4b6c7ebc51", "e24bf70e84a2 faa9766b62a6", "b0782e1045bb 4091ed58e4ad", "6d72123a68aa 38db48f4f3bd",
        "f34f52042f2c acfb16ea6b52", "715cc51d2412 edca4166a5c9", "fb4403e8f781 32d602912705", "a12149e8a236 1b4b6c7ebc51",
        "38c39ad86bcf faa9766b62a6", "2be8822445b4 4091ed58e4ad", "33639d7e4447 38db48f4f3bd",
    ),
    "mnist-smoke.yaml": (
        "ad2aa801169a 849dcf89222c", "a4116ae740b2 6db271077f09",
    ),
    "mnist.yaml": (
        "47a020b22bb7 b1631ac89bad", "4ddb7d309ddf 41919cd0910e", "b60dbd6ed742 10d0e39d51a6",
        "3185a0a8ad96 4a88bc5b9a79", "db91b1a45751 216312d382af", "362af0fa7a7e 1272f9bc4663",
        "75d4be936970 fc49e869be54", "e5a3405431d0 f72d1165f9e2", "b4ee655712da 0b2063f7cb9b",
        "e98001fd07c9 bd3d1a2c93e0", "cbc4172dcbf6 b3fcce10816b",
    ),
}


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_shipped_specs_keep_their_ids(path):
    assert set(SHIPPED_IDS) == {p.name for p in SPECS}, "a spec was added or removed: list its ids here"
    got = tuple(f"{c.config_id} {c.model_key}" for c in load_spec(path).configurations())
    assert got == SHIPPED_IDS[path.name]


# ---- ids ----------------------------------------------------------------------------------------------------

def test_config_id_is_a_hash_of_the_canonical_json():
    c = Configuration("iris", depth=3, seed=1)
    text = c.canonical_json()
    assert " " not in text and json.loads(text) == {k: v for k, v in c.to_dict().items() if k in json.loads(text)}
    assert c.config_id == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert len(c.model_key) == 12 and int(c.model_key, 16) >= 0
    assert c.label() == "mlp d3 w5 tanh wd0.005 s1"


def test_config_id_is_stable_across_processes():
    code = ("from jobs.spec import load_spec; "
            "print(' '.join(c.config_id + c.model_key for c in load_spec('jobs/specs/iris.yaml').configurations()))")
    runs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    here = " ".join(c.config_id + c.model_key for c in load_spec(ROOT / "jobs/specs/iris.yaml").configurations())
    assert runs == {here + "\n"}


def test_config_id_golden():
    # Changing the canonical form orphans every stored result: do it only on purpose, and update this value.
    assert Configuration("iris").config_id == "4b725db2fceb"


def test_config_id_ignores_sweep_list_order_and_number_spelling():
    a = parse_spec({"experiment": "x", "sweep": {"depth": [1, 2, 3], "weight_decay": [0.005, 0], "lr": [1]}})
    b = parse_spec({"experiment": "x", "sweep": {"weight_decay": [0.0, 0.005], "lr": [1.0], "depth": [3, 1, 2]}})
    assert ids(a) != ids(b) and sorted(ids(a)) == sorted(ids(b))
    assert a.spec_hash == b.spec_hash
    assert Configuration("x", weight_decay=-0.0).config_id == Configuration("x", weight_decay=0).config_id


ALTERNATIVES = {
    "experiment": "y", "dataset": "digits", "test_fraction": 0.3, "split_seed": 1, "model": "logistic",
    "depth": 2, "width": 6, "activation": "relu", "optimizer": "sgd", "lr": 0.02, "epochs": 10,
    "data_root": None, "subset": None, "test_subset": None,  # (iris has a fixed size)
    "classes": None, "per_class": None, "image_size": None,
    "momentum": 0.5, "batch_size": 32, "schedule": "cosine", "mixed_precision": None, "dtype": "float32",
    "retrain_start": "scratch",
    "weight_decay": 0.0, "seed": 1, "methods": ("exact", "cg"), "damping": 0.1,
    "solvers": {"exact": {"curvature": "ggn"}}, "test_chunk": 4, "grad_chunk": 64, "train_shard": 50,
    "damping_policy": "always",
    "test_points": (TestPointRule("highest", 1),), "removals": (RemovalRule("top_k", 5),), "retrain_epochs": 3,
    "retrain_lr": 0.5, "controls": 1, "perturbation": 0.0, "retrain_chunk": 7, "grad_tol": 1e-8,
    "replicates": 4, "retrain_checkpoint_every": 100, "train_checkpoint_every": 50,
    "ground_truth": "pbrf",
    "truth_settings": None,  # settings of loo are refused; a pbrf setting's own test: tests/test_truths.py
}


@pytest.mark.parametrize("name", S.FIELDS)
def test_config_id_differs_when_any_field_differs(name):
    assert set(ALTERNATIVES) == set(S.FIELDS)
    if ALTERNATIVES[name] is None:
        pytest.skip(f"{name} has a single allowed value for now")
    base = Configuration("x")
    other = dataclasses.replace(base, **{name: ALTERNATIVES[name]})
    if name in S._NOT_IN_ID:  # how much of the measurement to take, or how it runs: the same configuration
        assert other.config_id == base.config_id and other.model_key == base.model_key
        return
    assert other.config_id != base.config_id
    assert (other.model_key == base.model_key) == (name not in S.MODEL_FIELDS)


def test_model_key_is_shared_by_configs_differing_in_ground_truth_only():
    spec = parse_spec({"experiment": "x", "sweep": {"retrain_epochs": [100, 200], "damping": [0.01, 0.1]}})
    configs = spec.configurations()
    assert len({c.config_id for c in configs}) == 4 and len({c.model_key for c in configs}) == 1
    assert Configuration("a").model_key == Configuration("b").model_key  # checkpoints shared across experiments
    assert Configuration("a").model_key != Configuration("a", weight_decay=0.0).model_key


def test_hand_built_spec_expands_its_grids():
    spec = parse_spec({"experiment": "x", "sweep": [{"depth": [1, 2]}, {"width": [7], "depth": [2]}]})
    by_hand = dataclasses.replace(spec, _configurations=())
    assert by_hand == spec and by_hand.configurations() == spec.configurations()


def test_spec_hash_changes_with_the_configurations():
    def spec_hash(**sections):
        return parse_spec({"experiment": "x", **sections}).spec_hash

    assert spec_hash() != spec_hash(sweep={"seed": [0, 1]})
    assert spec_hash() == spec_hash(sweep={"seed": [0]}) == spec_hash(resources={"retrain": {"num_gpus": 1}})


def test_values_pickle():
    spec = load_spec(ROOT / "jobs/specs/iris-smoke.yaml")
    c = spec.configurations()[1]
    again = pickle.loads(pickle.dumps(c))
    assert again == c and again.config_id == c.config_id and hash(again) == hash(c)
    err = pickle.loads(pickle.dumps(SpecError("a.b", 3, "b must be 4", "f.yaml")))
    assert str(err) == "spec f.yaml: a.b: 3 is not allowed (b must be 4)" and err.key == "a.b" and err.value == 3
