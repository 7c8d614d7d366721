from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "has_seed", "seed", "max_tokens", "stop", "stop_token_ids", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    has_seed: bool
    seed: int
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("offset", "length", "image_hash", "embedding_handle")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HASH_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_HANDLE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    image_hash: bytes
    embedding_handle: bytes
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., image_hash: _Optional[bytes] = ..., embedding_handle: _Optional[bytes] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "images", "pipeline_secret")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_SECRET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    images: _containers.RepeatedCompositeFieldContainer[ImageRef]
    pipeline_secret: bytes
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageRef, _Mapping]]] = ..., pipeline_secret: _Optional[bytes] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "transfer_handle", "cached_tokens", "finished", "finish_reason", "text", "hold_id")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    transfer_handle: bytes
    cached_tokens: int
    finished: bool
    finish_reason: str
    text: str
    hold_id: int
    def __init__(self, first_token_id: _Optional[int] = ..., transfer_handle: _Optional[bytes] = ..., cached_tokens: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., text: _Optional[str] = ..., hold_id: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "embedding_pin_ids", "hold_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_PIN_IDS_FIELD_NUMBER: _ClassVar[int]
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    embedding_pin_ids: _containers.RepeatedScalarFieldContainer[str]
    hold_id: int
    def __init__(self, request_id: _Optional[str] = ..., embedding_pin_ids: _Optional[_Iterable[str]] = ..., hold_id: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "first_token_id", "sampling", "transfer_handle", "images", "pipeline")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token_id: int
    sampling: SamplingParams
    transfer_handle: bytes
    images: _containers.RepeatedCompositeFieldContainer[ImageRef]
    pipeline: KVPipeline
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token_id: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., transfer_handle: _Optional[bytes] = ..., images: _Optional[_Iterable[_Union[ImageRef, _Mapping]]] = ..., pipeline: _Optional[_Union[KVPipeline, _Mapping]] = ...) -> None: ...

class KVPipeline(_message.Message):
    __slots__ = ("prefill_worker_id", "pipeline_secret")
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_SECRET_FIELD_NUMBER: _ClassVar[int]
    prefill_worker_id: str
    pipeline_secret: bytes
    def __init__(self, prefill_worker_id: _Optional[str] = ..., pipeline_secret: _Optional[bytes] = ...) -> None: ...

class WatchPrefillRequest(_message.Message):
    __slots__ = ("request_id", "pipeline_secret")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_SECRET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pipeline_secret: bytes
    def __init__(self, request_id: _Optional[str] = ..., pipeline_secret: _Optional[bytes] = ...) -> None: ...

class PrefillProgress(_message.Message):
    __slots__ = ("transfer_handle", "final", "first_token_id", "finished", "finish_reason", "num_preemptions")
    TRANSFER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    transfer_handle: bytes
    final: bool
    first_token_id: int
    finished: bool
    finish_reason: str
    num_preemptions: int
    def __init__(self, transfer_handle: _Optional[bytes] = ..., final: _Optional[bool] = ..., first_token_id: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., num_preemptions: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "output_token_ids", "images")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageRef]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., images: _Optional[_Iterable[_Union[ImageRef, _Mapping]]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "image")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: bytes
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("token_ids", "image_hash", "num_embeddings", "embedding_handle", "cache_hit")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    image_hash: bytes
    num_embeddings: int
    embedding_handle: bytes
    cache_hit: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., image_hash: _Optional[bytes] = ..., num_embeddings: _Optional[int] = ..., embedding_handle: _Optional[bytes] = ..., cache_hit: _Optional[bool] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "cached_tokens", "error")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    cached_tokens: int
    error: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    def __init__(self, aborted: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "role", "num_blocks", "num_free_blocks", "num_running", "num_waiting", "num_held", "queued_prefill_tokens", "num_prompt_tokens_computed", "kv_usage", "num_steps_total", "step_ms_total", "num_prefill_tokens_total", "num_decode_tokens_total", "last_step_ms", "last_num_decode_requests", "last_num_prefill_tokens", "num_encode_waiting", "num_images_encoded_total", "num_embedding_cache_hits_total", "num_embedding_pages", "num_free_embedding_pages", "num_quarantined_blocks", "num_notifications_dropped_total", "num_kv_checksum_mismatches_total", "num_kv_blocks_pulled_total", "num_kv_blocks_reused_total", "num_kv_pipelined_reads_total")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_HELD_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_NUM_DECODE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LAST_NUM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_ENCODE_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_ENCODED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDDING_CACHE_HITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDDING_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_EMBEDDING_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_QUARANTINED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_NOTIFICATIONS_DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_CHECKSUM_MISMATCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_PULLED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_REUSED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_PIPELINED_READS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    num_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    num_held: int
    queued_prefill_tokens: int
    num_prompt_tokens_computed: int
    kv_usage: float
    num_steps_total: int
    step_ms_total: float
    num_prefill_tokens_total: int
    num_decode_tokens_total: int
    last_step_ms: float
    last_num_decode_requests: int
    last_num_prefill_tokens: int
    num_encode_waiting: int
    num_images_encoded_total: int
    num_embedding_cache_hits_total: int
    num_embedding_pages: int
    num_free_embedding_pages: int
    num_quarantined_blocks: int
    num_notifications_dropped_total: int
    num_kv_checksum_mismatches_total: int
    num_kv_blocks_pulled_total: int
    num_kv_blocks_reused_total: int
    num_kv_pipelined_reads_total: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., num_blocks: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_held: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., num_prompt_tokens_computed: _Optional[int] = ..., kv_usage: _Optional[float] = ..., num_steps_total: _Optional[int] = ..., step_ms_total: _Optional[float] = ..., num_prefill_tokens_total: _Optional[int] = ..., num_decode_tokens_total: _Optional[int] = ..., last_step_ms: _Optional[float] = ..., last_num_decode_requests: _Optional[int] = ..., last_num_prefill_tokens: _Optional[int] = ..., num_encode_waiting: _Optional[int] = ..., num_images_encoded_total: _Optional[int] = ..., num_embedding_cache_hits_total: _Optional[int] = ..., num_embedding_pages: _Optional[int] = ..., num_free_embedding_pages: _Optional[int] = ..., num_quarantined_blocks: _Optional[int] = ..., num_notifications_dropped_total: _Optional[int] = ..., num_kv_checksum_mismatches_total: _Optional[int] = ..., num_kv_blocks_pulled_total: _Optional[int] = ..., num_kv_blocks_reused_total: _Optional[int] = ..., num_kv_pipelined_reads_total: _Optional[int] = ...) -> None: ...
