"""Stop rules: when a sequence is finished after a new token, and where a stop string cuts text."""

from collections.abc import Collection

from tandem.engine.sequence import Sequence, SequenceStatus


def token_stop_status(
    seq: Sequence, eos_token_ids: Collection[int], max_model_len: int
) -> SequenceStatus | None:
    """Finished status implied by ``seq``'s newest token, or None to keep generating.

    Follows vLLM: nothing stops before ``min_tokens`` except length; EOS (unless ``ignore_eos``)
    and ``stop_token_ids`` stop; ``max_tokens`` or the context length end with "length".
    """
    params = seq.sampling_params
    token = seq.token_ids[-1]
    num_out = seq.num_output_tokens
    if num_out >= params.min_tokens:
        if not params.ignore_eos and token in eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            seq.stop_reason = token
            return SequenceStatus.FINISHED_STOPPED
    if num_out >= params.max_tokens or seq.num_tokens >= max_model_len:
        return SequenceStatus.FINISHED_LENGTH
    return None


def find_stop_string(
    text: str, num_new_chars: int, stops: tuple[str, ...], *, min_start: int = 0
) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last ``num_new_chars`` characters of ``text``
    and starts at or after ``min_start``.

    Returns (index where the stop string starts, the stop string), or None.
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        # A match must end in the new text; it may start up to len(stop)-1 chars before it.
        start = max(min_start, len(text) - num_new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
