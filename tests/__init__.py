"""kvlab's tests, in folders that mirror the code's (tests/router/ tests router/, and so on)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]   # the repository root
