"""The Gateway API Inference Extension's SLO headers: whole milliseconds, bounded, strictly parsed."""
import pytest

from kvlab.wire.openai_api import ApiError
from router.frontdoor.slo_headers import MAX_MS, TPOT_HEADER, TTFT_HEADER, SloTarget, parse_slo_headers


def test_absent_headers_state_no_slo():
    assert parse_slo_headers({}) is None


def test_whole_milliseconds_become_seconds():
    assert parse_slo_headers({TTFT_HEADER: "250"}) == SloTarget(ttft_s=0.25)
    assert parse_slo_headers({TPOT_HEADER: " 40 ", TTFT_HEADER: str(MAX_MS)}) == SloTarget(ttft_s=MAX_MS / 1000,
                                                                                         tpot_s=0.04)


@pytest.mark.parametrize("header", [TTFT_HEADER, TPOT_HEADER])
@pytest.mark.parametrize("value", ["0", "-5", "+5", "1.5", "1e3", "abc", "", "12 3", "\u0661\u0662",
                                   str(MAX_MS + 1), "9" * 40])
def test_anything_else_is_a_400_naming_the_header(header, value):
    with pytest.raises(ApiError) as info:
        parse_slo_headers({header: value})
    err = info.value
    assert err.status == 400 and err.param == header and header in err.message
    assert "\n" not in err.message and err.code == "invalid_slo_header"
