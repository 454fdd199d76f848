"""The result tables: their schemas, where their parts live, atomic part writes, and dataset reads.

Layout: ``<root>/<experiment>/<table>/config_id=<id>/<part>.parquet``. The configuration id lives only in
the directory name (a hive partition, declared as a string so that "000123" never becomes 123); the
Parquet files do not contain it and every read adds it back as the first column.

A part is the output of one task and is named after the task key, so a task that runs twice rewrites the
same file instead of adding a duplicate. Same family of names for every stored thing: ``part_path``,
``write_part``, ``read_part``, ``part_exists``, ``delete_part`` (and ``checkpoint_path``,
``save_checkpoint``, ... in ``checkpoints.py``).

Tables gain columns over time: a part written before a column existed reads it as null (``read_part``
conforms every part to today's schema, and ``dataset`` reads every part with it).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .retry import with_retries
from .uri import Store, StoreError, check_name, delete_file, is_file, list_files, move_file, read_bytes, write_atomic

__all__ = [
    "TABLES", "PARTITION", "table_schema", "table_dir", "part_path", "write_part", "part_exists",
    "delete_part", "read_part", "read_table", "dataset", "parse_part_path", "CorruptPart", "set_aside",
    "SET_ASIDE",
]

# Bad files are moved here (under the experiment, hidden from every listing by the leading "_"), never deleted.
SET_ASIDE = "_set_aside"


class CorruptPart(StoreError):
    """A stored file that cannot be read as what its name says it is (truncated, foreign schema, a
    checkpoint of another model). Callers set it aside (``set_aside(store, experiment, e.where, e.reason)``)
    and recompute it. ``path`` is the file as the user writes it (``Store.uri_of``), ``where`` the same file
    inside the store's filesystem."""

    def __init__(self, path: str, reason: str, where: str | None = None):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.where = path, reason, path if where is None else where

    def __reduce__(self):  # so that it crosses process boundaries (Ray) intact
        return (CorruptPart, (self.path, self.reason, self.where))

PARTITION = "config_id"
_SUFFIX = ".parquet"


def _key(name: str, type_: pa.DataType) -> pa.Field:
    # Key columns (those that identify a row inside a configuration) may not be null: a row without its
    # key could never be joined or deduplicated, so write_part refuses it with a message.
    return pa.field(name, type_, nullable=False)


_str, _f64, _i64, _bool = pa.string(), pa.float64(), pa.int64(), pa.bool_()

# Schemas WITHOUT config_id (it is the partition directory). One row per: see DESIGN.md, "The result tables".
# The Ray node that computed a row (its id and address; null in inline runs and older parts): in the tables whose
# rows tasks compute.
_NODE_COLUMNS = (("node_id", _str), ("node_ip", _str))

TABLES: dict[str, pa.Schema] = {
    "configs": pa.schema([
        _key("spec_hash", _str), ("version", _str), ("experiment", _str),
        ("config", _str),  # canonical JSON of the whole configuration: the source of truth
        # One flat column per field of jobs.spec.Configuration, so SQL can group by any swept axis without
        # JSON functions (jobs/records.py fills them; tests/test_configs_table.py checks that every field has
        # its column). Named after the field; ints int64, floats float64 (subset, a fraction or a count,
        # too), bools bool, strings string; methods comma-joined ("exact,cg"); the structured fields
        # (classes, solvers, test_points, removals) as the canonical JSON of their Configuration.to_dict()
        # value. These first ones are the columns stores had first ...
        ("dataset", _str), ("model", _str), ("depth", _i64), ("width", _i64), ("activation", _str),
        ("weight_decay", _f64), ("lr", _f64), ("epochs", _i64), ("seed", _i64), ("retrain_epochs", _i64),
        ("damping", _f64), ("methods", _str), ("science", _str),
        # ... and these the rest, in field order: parts written before they existed read them as null.
        ("test_fraction", _f64), ("split_seed", _i64), ("data_root", _str), ("subset", _f64),
        ("test_subset", _i64), ("classes", _str), ("per_class", _i64), ("image_size", _i64),
        ("optimizer", _str), ("momentum", _f64), ("batch_size", _i64), ("schedule", _str),
        ("mixed_precision", _bool), ("dtype", _str), ("damping_policy", _str), ("solvers", _str),
        ("test_chunk", _i64), ("grad_chunk", _i64), ("test_points", _str), ("removals", _str),
        ("retrain_start", _str), ("retrain_lr", _f64), ("controls", _i64), ("perturbation", _f64),
        ("retrain_chunk", _i64), ("grad_tol", _f64), ("replicates", _i64), ("train_shard", _i64),
        ("retrain_checkpoint_every", _i64), ("train_checkpoint_every", _i64), ("ground_truth", _str),
        ("truth_settings", _str),
    ]),
    "models": pa.schema([
        _key("model_key", _str), ("train_loss", _f64), ("test_loss", _f64), ("test_accuracy", _f64),
        ("train_accuracy", _f64), ("objective", _f64), ("grad_norm", _f64), ("top_eigenvalue", _f64),
        ("min_eigenvalue", _f64), ("n_params", _i64), ("n_train", _i64), ("seconds", _f64),
        ("checkpoint", _str), ("degenerate", _bool), ("degenerate_reason", _str), ("science", _str),
        # Whether θ̂ is a stationary point: grad_norm <= the configuration's grad_tol (null: no tolerance set).
        ("stationary", _bool),
        *_NODE_COLUMNS,
    ]),
    "test_points": pa.schema([
        _key("test_idx", _i64), ("loss", _f64), ("label", _i64), ("selection", _str), ("science", _str),
        # Covariates of the test point at θ̂: the logit of its label minus the largest other logit (negative:
        # misclassified), ‖∇θ L(z_t, θ̂)‖₂, and whether the predicted class is not its label.
        ("margin", _f64), ("grad_norm", _f64), ("misclassified", _bool),
    ]),
    "influence": pa.schema([
        _key("method", _str), _key("test_idx", _i64), _key("train_idx", _i64), ("estimate", _f64),
        ("predicted_dtheta", _f64), ("damping", _f64), ("iterations", _i64), ("residual", _f64),
        ("diverged", _bool), ("seconds", _f64), ("science", _str),
        # ∇L(z_t)ᵀ (H + δI)⁻¹ ∇L(z_t): the test point's self-influence under this method (one per test point).
        ("self_influence", _f64),
        *_NODE_COLUMNS,
    ]),
    "retrain": pa.schema([
        # removed: a training index; negative = control replicate (-1 first control, -2 second, ...).
        _key("removed", _i64), _key("test_idx", _i64), ("loss_retrained", _f64), ("loss_control", _f64),
        ("actual", _f64), ("dtheta", _f64), ("mode", _str), ("epochs", _i64), ("seed", _i64),
        ("seconds", _f64),
        # Group removal: removed is the group id, members the removed training points (null otherwise).
        ("group_size", _i64), ("members", pa.list_(_i64)), ("science", _str),
        # The draw of training noise (minibatch order, start, initialisation) this row was retrained under:
        # removals and their control of one replicate share it; replicate 0 (null in parts written before
        # replicates existed) is the protocol's first draw. grad_norm: ‖∇R₋ᵢ‖₂ of the retrained parameters.
        ("replicate", _i64), ("grad_norm", _f64),
        # The ground truth (jobs/spec_checks.py GROUND_TRUTHS; null in parts written before it existed: loo of the
        # configuration's retrain_start). A solved one (pbrf, last_layer): grad_norm is ‖∇J‖₂ of its objective
        # (influence/truths.py), iterations the Newton steps it took (null for retraining) and epochs 0.
        ("ground_truth", _str), ("iterations", _i64),
        *_NODE_COLUMNS,
    ]),
    "stats": pa.schema([
        _key("method", _str), _key("test_idx", _i64), _key("snapshot", _i64), ("n", _i64),
        ("pearson", _f64), ("spearman", _f64), ("pearson_lo", _f64), ("pearson_hi", _f64),
        ("spearman_lo", _f64), ("spearman_hi", _f64), ("sign_agreement", _f64), ("top10_overlap", _f64),
        ("dtheta_spearman", _f64), ("noise_floor", _f64), ("actual_std", _f64), ("selection", _str),
        ("final", _bool), ("degenerate_reason", _str),
        # actual_std / noise_floor, and whether the effects are within the noise (snr <= 1): then the
        # correlation measures noise, not influence.
        ("snr", _f64), ("below_noise_floor", _bool),
        # Group removal: the test loss change of removing this test point's top group, and the mean and
        # spread of the random groups' changes (the reference it is compared with).
        ("group_actual", _f64), ("random_group_mean", _f64), ("random_group_std", _f64),
        # Cells whose correlations are undefined and left out of every mean (their correlation columns are
        # NaN): the network collapsed to a constant predictor, or this method's solve diverged.
        ("collapsed", _bool), ("diverged", _bool),
        # science: the version of the science code that computed the row (jobs/science.py); science_inputs:
        # "table=version" for every version among the parts it was computed from, ";"-separated.
        ("science", _str), ("science_inputs", _str),
        # How far the ground truth itself can be trusted (influence/reliability.py). replicates: how many
        # replicates its mean holds; reliability (reliability_pearson): the Spearman-Brown split-half
        # reliability of that mean's ranking (values); ceiling = √reliability, the correlation a perfect
        # estimator could expect; *_corrected: the correlation over √reliability (corrected for attenuation);
        # unreliable: reliability < 0.5 (null while unknown: one replicate).
        ("replicates", _i64), ("reliability", _f64), ("reliability_pearson", _f64), ("ceiling", _f64),
        ("spearman_corrected", _f64), ("pearson_corrected", _f64), ("unreliable", _bool),
        # Chance: permutation p-values and the 95% quantile of |correlation| under the null for this n;
        # chance = the Spearman is indistinguishable from chance (p >= 0.05). Bootstrap intervals over the
        # training points (and the replicates). Computed in the final statistics (null in running snapshots).
        ("spearman_p", _f64), ("pearson_p", _f64), ("spearman_null95", _f64), ("pearson_null95", _f64),
        ("chance", _bool), ("spearman_boot_lo", _f64), ("spearman_boot_hi", _f64), ("pearson_boot_lo", _f64),
        ("pearson_boot_hi", _f64),
        # θ̂ is a stationary point to the configuration's grad_tol (null: no tolerance set); the largest
        # ‖∇R‖₂ of the retrained models this row's ground truth comes from.
        ("stationary", _bool), ("retrain_grad_norm", _f64),
        # The ground truth the row's actual effects come from (the retrain rows' ground_truth; null for rows
        # computed from parts that did not record it: leave-one-out, as the configuration's retrain_start says).
        ("ground_truth", _str),
    ]),
    # LDS (ground_truth.kind lds): one row per subset of the training set a model was retrained on, enough for any
    # reader to recompute the score: the points it leaves out (sorted; its retrain rows' members), the seed they
    # were drawn with (jobs/protocol.py lds_subsets), the share kept, n_train, and a hash of the mask
    # (protocol.mask_hash: sha256 of n bytes, 1 kept and 0 left out).
    "subsets": pa.schema([
        _key("subset", _i64), ("seed", _i64), ("fraction", _f64), ("n_train", _i64), ("mask_hash", _str),
        ("left_out", pa.list_(_i64)), ("science", _str),
    ]),
}

_PARTITIONING = ds.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")


def table_schema(table: str, *, with_config_id: bool = True) -> pa.Schema:
    """The schema of ``table`` as read (config_id first) or, without it, as stored in each part."""
    schema = TABLES.get(table)
    if schema is None:
        raise StoreError(f"unknown table {table!r}; the tables are: {', '.join(TABLES)}")
    if with_config_id:
        schema = schema.insert(0, pa.field(PARTITION, pa.string(), nullable=False))
    return schema


def table_dir(store: Store, experiment: str, table: str) -> str:
    """``<root>/<experiment>/<table>``: the dataset root of one table."""
    table_schema(table)
    return store.path(check_name("experiment", experiment), table)


def part_path(store: Store, experiment: str, table: str, config_id: str, part: str) -> str:
    """``<root>/<experiment>/<table>/config_id=<id>/<part>.parquet``; ``part`` is a task key."""
    check_name("config_id", config_id)
    check_name("part", part)
    if part.endswith(_SUFFIX):
        raise StoreError(f"part {part!r}: give the task key without the {_SUFFIX} suffix")
    return f"{table_dir(store, experiment, table)}/{PARTITION}={config_id}/{part}{_SUFFIX}"


def parse_part_path(relative: str) -> tuple[str, str, str] | None:
    """``"<table>/config_id=<id>/<part>.parquet"`` -> (table, config_id, part); None for anything else.

    Anything else includes hidden or temporary files (leading "." or "_"), the checkpoints folder and
    files at the wrong depth: listings (the ledger, reads) only ever see finished parts.
    """
    segments = relative.strip("/").split("/")
    if len(segments) != 3:
        return None
    table, folder, name = segments
    if table not in TABLES or not folder.startswith(PARTITION + "=") or not name.endswith(_SUFFIX):
        return None
    config_id, part = folder[len(PARTITION) + 1:], name[: -len(_SUFFIX)]
    if not config_id or not part or config_id[0] in "._" or part[0] in "._":
        return None
    return table, config_id, part


def _conform(table: str, rows: pa.Table | Mapping[str, Sequence], config_id: str) -> pa.Table:
    """Cast ``rows`` to the stored schema of ``table``, with messages that name the offending column."""
    schema = table_schema(table, with_config_id=False)
    if isinstance(rows, (pa.Table, pa.RecordBatch)):
        columns = {name: rows.column(name) for name in rows.column_names}
    elif isinstance(rows, Mapping):
        columns = dict(rows)
    else:
        raise StoreError(f"{table}: rows must be an Arrow table or a dict of columns (name -> list of values), "
                         f"got {type(rows).__name__}")
    if PARTITION in columns:
        # Tolerated so that a table read back (which carries config_id) can be written again, but it must
        # agree with the directory it goes to: the directory is the only place the id is stored.
        ids = columns.pop(PARTITION)
        values = {ids} if isinstance(ids, str) else {str(v) for v in pa.array(ids).to_pylist()}
        if values - {config_id}:
            raise StoreError(f"{table}: rows carry config_id {sorted(map(str, values))} but are written "
                             f"under config_id={config_id}; drop the column or write to the right id")
    unknown = [name for name in columns if schema.get_field_index(name) < 0]
    if unknown:
        raise StoreError(f"{table}: unknown column(s) {unknown}; the columns of {table} are "
                         f"{schema.names} (config_id comes from the partition)")
    for name, values in columns.items():
        if hasattr(values, "detach") and hasattr(values, "numpy"):  # a torch tensor, without importing torch
            columns[name] = values = values.detach().cpu().numpy()
        if not hasattr(values, "__len__") or isinstance(values, (str, bytes)):
            raise StoreError(f"{table}: column {name!r} must be a sequence of values, got {type(values).__name__}")
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise StoreError(f"{table}: columns have different lengths {sorted(lengths)}")
    n_rows = lengths.pop() if lengths else 0
    arrays = []
    for field in schema:
        if field.name not in columns:
            if not field.nullable and n_rows:
                raise StoreError(f"{table}: missing key column {field.name!r} ({field.type}); "
                                 f"key columns cannot be null")
            arrays.append(pa.nulls(n_rows, field.type))
            continue
        values = columns[field.name]
        try:
            # Infer first, then cast: pa.array(list, type=int64) would silently truncate 0.5 to 0.
            is_arrow = isinstance(values, (pa.Array, pa.ChunkedArray))
            array = values if is_arrow else pa.array(values, from_pandas=True)
            if _family(array.type) not in ("null", _family(field.type)):
                raise TypeError(f"got {array.type} values")  # Arrow would parse "1" as 1, or print 1 as "1"
            array = array.cast(field.type, safe=True)  # safe: 1.5 -> int64 and 2**40 -> int32 fail
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
                OverflowError) as exc:
            raise StoreError(f"{table}: column {field.name!r} must be {field.type}: {exc}") from exc
        if not field.nullable and array.null_count:
            raise StoreError(f"{table}: key column {field.name!r} has {array.null_count} null value(s)")
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=schema)


def _family(type_: pa.DataType) -> str:
    """Which kind of value a type holds; casts are allowed within a kind only (int32 -> int64, int -> float)."""
    if pa.types.is_null(type_):
        return "null"
    if pa.types.is_dictionary(type_):  # e.g. categorical strings from pandas
        return _family(type_.value_type)
    if pa.types.is_integer(type_) or pa.types.is_floating(type_):
        return "number"
    if pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_):
        return "string"
    if pa.types.is_boolean(type_):
        return "bool"
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        # Parquet names a list's item "element", Arrow "item": the same kind of value either way.
        return f"list<{_family(type_.value_type)}>"
    return str(type_)


def write_part(store: Store, experiment: str, table: str, config_id: str, part: str,
               rows: pa.Table | Mapping[str, Sequence]) -> str:
    """Write one part of ``table`` atomically and return its path.

    ``rows`` (an Arrow table or a dict of columns) is cast to the table's schema: absent nullable columns
    become nulls, unknown columns or uncastable values raise ``StoreError`` naming the column. The file is
    serialised in memory first, so a failure of the cast or of the encoding writes nothing at all; then it
    is put in place by ``write_atomic`` (temporary name + rename locally, one whole PUT on S3; transient
    errors retried). Writing a part again replaces it.
    """
    path = part_path(store, experiment, table, config_id, part)
    data = _conform(table, rows, config_id)
    sink = pa.BufferOutputStream()
    pq.write_table(data, sink)
    return write_atomic(store, path, sink.getvalue().to_pybytes())


def part_exists(store: Store, experiment: str, table: str, config_id: str, part: str) -> bool:
    """Whether that part has been written (for many parts, use a ``Ledger``: one listing for all)."""
    return is_file(store, part_path(store, experiment, table, config_id, part))


def delete_part(store: Store, experiment: str, table: str, config_id: str, part: str) -> bool:
    """Remove a part (e.g. a running snapshot superseded by the final one); False if it was not there."""
    return delete_file(store, part_path(store, experiment, table, config_id, part))


def set_aside(store: Store, experiment: str, path: str, reason: str) -> str:
    """Move the bad file at ``path`` (a part or a checkpoint of ``experiment``) to
    ``<experiment>/_set_aside/<its path below the experiment>.<UTC time>`` and return a message that names
    both places and the reason. The file is kept for inspection; listings no longer see it, so the task that
    makes it runs again."""
    base = store.path(check_name("experiment", experiment)) + "/"
    relative = path[len(base):] if path.startswith(base) else path.rsplit("/", 1)[-1]
    target = f"{base}{SET_ASIDE}/{relative}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    move_file(store, path, target)
    return (f"set aside {store.uri_of(path)} ({reason}); kept as {store.uri_of(target)}, and what it held is "
            f"computed again")


def read_part(store: Store, path: str) -> pa.Table:
    """One part, as written by ``write_part``, with its config_id column added back from its directory."""
    # The last three segments are enough: the store root may be any depth, the layout below it is fixed.
    parsed = parse_part_path("/".join(path.rstrip("/").split("/")[-3:]))
    if parsed is None:
        raise StoreError(f"{path!r} is not a part: expected .../<table>/config_id=<id>/<part>{_SUFFIX}")
    table, config_id, _ = parsed
    # One whole read (a part is small) rather than Parquet's several ranged reads: one request on S3.
    raw = read_bytes(store, path)
    if raw is None:
        raise StoreError(f"no part at {path}")
    try:
        data = pq.read_table(pa.BufferReader(raw))
    except Exception as exc:  # noqa: BLE001 - the bytes are in memory: any failure here is a bad file
        raise CorruptPart(store.uri_of(path), f"not a readable Parquet file ({len(raw)} bytes): "
                                              f"{type(exc).__name__}: {exc}", path) from None
    # Conform to today's schema, so that one part and the whole dataset read with the same types.
    try:
        data = _conform(table, data, config_id)
    except StoreError as exc:
        raise CorruptPart(store.uri_of(path), f"does not match the schema of the {table} table: {exc}",
                          path) from None
    ids = pa.array([config_id] * data.num_rows, pa.string())
    return data.add_column(0, pa.field(PARTITION, pa.string(), nullable=False), ids)


def _part_files(store: Store, experiment: str, table: str,
                config_ids: Sequence[str] | None) -> list[str]:
    """Paths of the finished parts of one table (temporary and hidden files excluded), sorted."""
    root = table_dir(store, experiment, table)
    wanted = None if config_ids is None else set(config_ids)
    infos = list_files(store, root)
    paths = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        parsed = parse_part_path(f"{table}/{info.path[len(root):].strip('/')}")
        if parsed is not None and (wanted is None or parsed[1] in wanted):
            paths.append(info.path)
    return sorted(paths)


def dataset(store: Store, experiment: str, table: str, *,
            config_ids: Sequence[str] | None = None) -> ds.Dataset | None:
    """The parts of ``table`` present now, as one Arrow dataset (config_id first); None if there are none.

    The file list is fixed when the dataset is built: parts written later need a new call. Files are
    listed by us rather than discovered by pyarrow so that the ledger and the reads apply the same rule
    about what counts as a part.
    """
    paths = _part_files(store, experiment, table, config_ids)
    if not paths:
        return None
    return ds.dataset(paths, schema=table_schema(table), format="parquet", filesystem=store.fs,
                      partitioning=_PARTITIONING, partition_base_dir=table_dir(store, experiment, table))


def read_table(store: Store, experiment: str, table: str, *,
               config_ids: Sequence[str] | None = None) -> pa.Table:
    """All parts of ``table`` (optionally only those of ``config_ids``) as one Arrow table.

    An absent table (nothing written yet) reads as an empty table with the full schema, config_id included.
    """
    if config_ids is not None:
        for config_id in config_ids:
            check_name("config_id", config_id)
    def read() -> pa.Table:
        found = dataset(store, experiment, table, config_ids=config_ids)
        return table_schema(table).empty_table() if found is None else found.to_table()

    return with_retries(read, op="read table", uri=store.uri_of(table_dir(store, experiment, table)))
