from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageRequest(_message.Message):
    __slots__ = ("prompt", "steps", "guidance", "seed", "share", "accepted_codecs", "height", "width", "scheduler", "model_fingerprint", "client_id", "negative_prompt")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_CODECS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    steps: int
    guidance: float
    seed: int
    share: float
    accepted_codecs: _containers.RepeatedScalarFieldContainer[str]
    height: int
    width: int
    scheduler: str
    model_fingerprint: str
    client_id: str
    negative_prompt: str
    def __init__(self, prompt: _Optional[str] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., share: _Optional[float] = ..., accepted_codecs: _Optional[_Iterable[str]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., scheduler: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., client_id: _Optional[str] = ..., negative_prompt: _Optional[str] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("request_id", "group_id", "group_size", "branch_step", "total_steps", "scheduler", "model_fingerprint", "guidance", "seed", "codec", "latent_shape", "min_similarity", "cached_steps", "negative_prompt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    BRANCH_STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    group_id: str
    group_size: int
    branch_step: int
    total_steps: int
    scheduler: str
    model_fingerprint: str
    guidance: float
    seed: int
    codec: str
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    min_similarity: float
    cached_steps: int
    negative_prompt: str
    def __init__(self, request_id: _Optional[str] = ..., group_id: _Optional[str] = ..., group_size: _Optional[int] = ..., branch_step: _Optional[int] = ..., total_steps: _Optional[int] = ..., scheduler: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., codec: _Optional[str] = ..., latent_shape: _Optional[_Iterable[int]] = ..., min_similarity: _Optional[float] = ..., cached_steps: _Optional[int] = ..., negative_prompt: _Optional[str] = ...) -> None: ...

class LatentChunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("chunks", "total_bytes", "sha256", "frame_sizes", "frame_names", "queue_wait_ms", "shared_phase_ms")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FRAME_SIZES_FIELD_NUMBER: _ClassVar[int]
    FRAME_NAMES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    SHARED_PHASE_MS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    total_bytes: int
    sha256: str
    frame_sizes: _containers.RepeatedScalarFieldContainer[int]
    frame_names: _containers.RepeatedScalarFieldContainer[str]
    queue_wait_ms: float
    shared_phase_ms: float
    def __init__(self, chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., frame_sizes: _Optional[_Iterable[int]] = ..., frame_names: _Optional[_Iterable[str]] = ..., queue_wait_ms: _Optional[float] = ..., shared_phase_ms: _Optional[float] = ...) -> None: ...

class ImageResponse(_message.Message):
    __slots__ = ("accepted", "chunk", "done")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    accepted: Accepted
    chunk: LatentChunk
    done: Done
    def __init__(self, accepted: _Optional[_Union[Accepted, _Mapping]] = ..., chunk: _Optional[_Union[LatentChunk, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "model_fingerprint", "scheduler_config_json", "default_steps", "default_guidance", "default_share", "codecs", "max_batch", "max_wait_ms", "max_steps", "max_prompt_chars", "max_image_side", "chunk_size", "default_height", "default_width")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SHARE_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    version: str
    model_fingerprint: str
    scheduler_config_json: str
    default_steps: int
    default_guidance: float
    default_share: float
    codecs: _containers.RepeatedScalarFieldContainer[str]
    max_batch: int
    max_wait_ms: float
    max_steps: int
    max_prompt_chars: int
    max_image_side: int
    chunk_size: int
    default_height: int
    default_width: int
    def __init__(self, version: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., scheduler_config_json: _Optional[str] = ..., default_steps: _Optional[int] = ..., default_guidance: _Optional[float] = ..., default_share: _Optional[float] = ..., codecs: _Optional[_Iterable[str]] = ..., max_batch: _Optional[int] = ..., max_wait_ms: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_prompt_chars: _Optional[int] = ..., max_image_side: _Optional[int] = ..., chunk_size: _Optional[int] = ..., default_height: _Optional[int] = ..., default_width: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("active_requests", "queued_requests", "running_windows", "tracked_clients", "open_windows", "admitted", "completed", "failed", "rejected", "status_counts", "windows_run", "windows_skipped", "windows_cancelled", "worker_failures", "worker_pids", "bytes_sent", "groups_run", "grouped_requests", "serving", "waiting_requests")
    class StatusCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    TRACKED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    OPEN_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    STATUS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_RUN_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    WORKER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    WORKER_PIDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    GROUPS_RUN_FIELD_NUMBER: _ClassVar[int]
    GROUPED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    active_requests: int
    queued_requests: int
    running_windows: int
    tracked_clients: int
    open_windows: int
    admitted: int
    completed: int
    failed: int
    rejected: int
    status_counts: _containers.ScalarMap[str, int]
    windows_run: int
    windows_skipped: int
    windows_cancelled: int
    worker_failures: int
    worker_pids: _containers.RepeatedScalarFieldContainer[int]
    bytes_sent: int
    groups_run: int
    grouped_requests: int
    serving: bool
    waiting_requests: int
    def __init__(self, active_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., running_windows: _Optional[int] = ..., tracked_clients: _Optional[int] = ..., open_windows: _Optional[int] = ..., admitted: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., rejected: _Optional[int] = ..., status_counts: _Optional[_Mapping[str, int]] = ..., windows_run: _Optional[int] = ..., windows_skipped: _Optional[int] = ..., windows_cancelled: _Optional[int] = ..., worker_failures: _Optional[int] = ..., worker_pids: _Optional[_Iterable[int]] = ..., bytes_sent: _Optional[int] = ..., groups_run: _Optional[int] = ..., grouped_requests: _Optional[int] = ..., serving: _Optional[bool] = ..., waiting_requests: _Optional[int] = ...) -> None: ...
