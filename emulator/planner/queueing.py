"""Queueing formulas the planner uses, each with the approximation it makes.

Notation: lam = arrival rate, S = service time with mean es and second moment es2, rho = lam x es per
server, c servers, ca2 / cs2 = squared coefficients of variation of interarrival / service times.

- M/G/1 mean wait, Pollaczek-Khinchine (exact for Poisson arrivals): W = lam es2 / (2 (1 - rho)).
- G/G/1 mean wait, Kingman: W ~= (ca2 + cs2)/2 x rho/(1 - rho) x es (exact for M/G/1 when ca2 = 1,
  asymptotically exact in heavy traffic, which is where SLOs bind).
- G/G/c mean wait, Allen-Cunneen: W ~= C(c, a) / (c mu - lam) x (ca2 + cs2)/2, the M/M/c wait (Erlang C)
  scaled by the same variability factor as Kingman's; the standard engineering approximation for pools.
- Whole M/G/1 waiting-time law, Pollaczek-Khinchine / Benes: W is a geometric sum of equilibrium
  residuals, P(N = n) = (1 - rho) rho^n, each with density (1 - F_S(x)) / E[S]. Computed on a time
  grid with an FFT; p99 TTFT comes from it, not from a mean-plus-sigma rule, because prompt lengths
  are heavy-tailed and an exponential tail of the right mean misses their p99 by 15-20%.
- M/G/1 with an exceptional first service (Welch 1964; the customer that starts a busy period has
  service S0, the rest S): W = W_M/G/1(S) + Y, independent (Fuhrmann-Cooper decomposition), where Y
  is 0 with probability 1 / d and has density lam (P(S0 > t) - P(S > t)) / d elsewhere,
  d = 1 - rho + lam E[S0]; E[W] = lam E[S^2] / (2 (1 - rho)) + lam (E[S0^2] - E[S^2]) / (2 d).
  A chunked-prefill worker is one: a prompt arriving at an idle worker runs alone, one arriving in a
  backlog is packed into full steps (the first-service law needs S0 >= S for each kind of request,
  which a step's fixed costs give). Pooled servers: the services per server and S / c, S0 / c (the
  stated approximation below).
- Work arriving in a window, capped (exact for Poisson arrivals, on a grid): the sizes that arrive in a
  window where Poisson(mu) arrivals are expected form a compound Poisson sum X; its law on a grid
  follows Panjer's recursion, f_0 = e^-mu, f_n = mu / n sum_j j s_j f_(n-j), and E[min(r, X)] is the
  sum of P(X > x) over the grid below r. A step with room for r more tokens packs that much of what
  arrived behind a prompt: mu x E[min(r, S)] while arrivals are rare, r once they are many, where a
  fluid flow x window gives r as soon as the *mean* fills it.
- G/G/1 and G/G/c variants of that law (stated approximations): the geometric parameter is set so the
  mean wait equals Kingman's (G/G/1); with c pooled servers the service is S / c and the chance of
  waiting Erlang C's (the M/M/c exact form, Allen-Cunneen's basis).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.fft import next_fast_len


def erlang_b(c: int, a: float) -> float:
    """Blocking probability of M/M/c/c with offered load a Erlangs (stable recursion, any c)."""
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


def erlang_c(c: int, a: float) -> float:
    """Probability an arrival waits in M/M/c with offered load a = lam/mu Erlangs (1 when a >= c)."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    b = erlang_b(c, a)
    return b / (1.0 - (a / c) * (1.0 - b))


def pk_wait(lam: float, es: float, es2: float) -> float:
    """Pollaczek-Khinchine mean wait in M/G/1 (inf when rho >= 1)."""
    rho = lam * es
    return math.inf if rho >= 1 else lam * es2 / (2.0 * (1.0 - rho))


def kingman_wait(lam: float, es: float, ca2: float, cs2: float) -> float:
    """Kingman's G/G/1 mean-wait approximation (inf when rho >= 1)."""
    rho = lam * es
    return math.inf if rho >= 1 else (ca2 + cs2) / 2.0 * rho / (1.0 - rho) * es


def allen_cunneen_wait(c: int, lam: float, es: float, ca2: float, cs2: float) -> float:
    """Allen-Cunneen G/G/c mean wait: Erlang-C wait of M/M/c times (ca2 + cs2)/2 (inf when unstable)."""
    a = lam * es
    if a >= c:
        return math.inf
    return erlang_c(c, a) / (c / es - lam) * (ca2 + cs2) / 2.0


def mg1_wait_pmf(service_values: np.ndarray, service_weights: np.ndarray, rho: float, h: float, cells: int,
                 ca2: float = 1.0, servers: int = 1, extra: np.ndarray | None = None) -> np.ndarray:
    """Waiting time of M/G/1 (Benes) on a grid of step h, with the G/G/1 and G/G/c adjustments above.

    The service law is given as points (values, weights) and used at its mean-preserving scale; rho is
    the utilization it must produce (the caller's measure of load). Mass beyond the grid is dropped.
    `extra`: an independent delay on the same grid added to the wait (`first_service_delay_pmf`),
    convolved in the same transform.
    """
    n = next_fast_len(2 * cells, real=True)
    if rho <= 0:
        pmf = np.zeros(cells)
        pmf[0] = 1.0
        return pmf if extra is None else extra.copy()
    s = np.asarray(service_values, dtype=float) / servers
    w = np.asarray(service_weights, dtype=float) / np.sum(service_weights)
    mean = float(s @ w)
    residual = residual_pmf(s, w, h, cells)
    cs2 = max(0.0, float((s ** 2) @ w) / mean ** 2 - 1.0)
    ratio = rho / (1 - rho) * (ca2 + cs2) / (1 + cs2)       # Kingman's mean wait in units of E[R]-ish
    geo = ratio / (1 + ratio)                               # geometric parameter giving that mean
    # the circular FFT folds the wait's mass past n cells back onto the grid: 2 x cells leaves only the
    # far tail to fold (the grid itself spans 12 mean waits, `prefill_queue`); a longer n folds less,
    # and a 2-3-5-smooth one is fast
    phi = np.fft.rfft(residual, n)
    law = (1 - geo) / (1 - geo * phi)
    if servers == 1 and extra is not None:
        law *= np.fft.rfft(extra, n)
    pmf = np.clip(np.fft.irfft(law, n)[:cells], 0.0, None)
    if servers > 1:
        waits = erlang_c(servers, servers * rho)
        pmf[1:] *= waits / max(pmf[1:].sum(), 1e-300)
        pmf[0] = 1.0 - waits
        if extra is not None:
            pmf = np.clip(np.fft.irfft(np.fft.rfft(pmf, n) * np.fft.rfft(extra, n), n)[:cells], 0.0, None)
    return pmf


def first_service_delay_pmf(service: np.ndarray, first: np.ndarray, weights: np.ndarray, lam: float, h: float,
                            cells: int, servers: int = 1) -> np.ndarray:
    """Y of the exceptional-first-service decomposition above on a grid of step h: request kind i
    (probability weights[i]) is served in service[i] in a backlog and in first[i] >= service[i] when
    it starts a busy period; lam arrivals per server. Each kind's density is flat on
    (service[i], first[i]], spread over the cells as `residual_pmf` spreads its masses."""
    s = np.asarray(service, dtype=float) / servers
    f = np.maximum(np.asarray(first, dtype=float) / servers, s)
    w = np.asarray(weights, dtype=float) / np.sum(weights)
    d = 1.0 - lam * float(s @ w) + lam * float(f @ w)
    pmf = np.zeros(cells)
    pmf[0] = 1.0 / d if lam > 0 else 1.0
    spread = f > s
    if lam <= 0 or not spread.any():
        return pmf
    edges = np.arange(cells + 1) * h
    # mass of kind i on [0, e]: c_i ((e - s_i)^+ - (e - f_i)^+), c_i = lam w_i / d, summed over kinds
    # as sorted cumulative sums (not a cells x kinds matrix: up to 65,536 cells)
    c = lam * w[spread] / d
    below = _ramps(edges, s[spread], c) - _ramps(edges, f[spread], c)
    mass = np.diff(below)
    pmf += 0.5 * mass
    pmf[1:] += 0.5 * mass[:-1]
    return pmf


def _ramps(e: np.ndarray, at: np.ndarray, c: np.ndarray) -> np.ndarray:
    """sum_i c_i (e - at_i)^+ at each e."""
    order = np.argsort(at, kind="stable")
    a, c = at[order], c[order]
    k = np.searchsorted(a, e, side="right")
    weight = np.concatenate([[0.0], np.cumsum(c)])
    moment = np.concatenate([[0.0], np.cumsum(c * a)])
    return e * weight[k] - moment[k]


def first_service_delay_mean(service: np.ndarray, first: np.ndarray, weights: np.ndarray, lam: float,
                             servers: int = 1) -> float:
    """Mean of Y above: lam (E[S0^2] - E[S^2]) / (2 d)."""
    if lam <= 0:
        return 0.0
    s = np.asarray(service, dtype=float) / servers
    f = np.maximum(np.asarray(first, dtype=float) / servers, s)
    w = np.asarray(weights, dtype=float) / np.sum(weights)
    d = 1.0 - lam * float(s @ w) + lam * float(f @ w)
    return lam * float((f ** 2 - s ** 2) @ w) / (2.0 * d)


def residual_pmf(s: np.ndarray, w: np.ndarray, h: float, cells: int) -> np.ndarray:
    """The equilibrium residual of service law (s, w) on a grid of step h, its mean kept exactly.

    Cell k holds the residual's mass on [k h, (k+1) h): the integral of the survival function there
    over E[S] (exact for point masses: G(e) = sum w min(s, e) is that integral up to e), split
    half to each end of the cell. A grid coarser than the service itself (heavy traffic, where the
    wait's extent is many services) therefore still gives the wait its right mean: sampling the
    survival function at the grid points instead put every residual at 0 and the wait with it.
    """
    edges = np.arange(cells + 1) * h
    # G(e) = sum over s <= e of w s, plus e x the weight of s > e: sorted cumulative sums, not a
    # cells x points matrix (65,536 cells near saturation)
    order = np.argsort(s, kind="stable")
    s_sorted, w_sorted = s[order], w[order]
    below = np.concatenate([[0.0], np.cumsum(w_sorted * s_sorted)])
    above = np.concatenate([np.cumsum(w_sorted[::-1])[::-1], [0.0]])
    k = np.searchsorted(s_sorted, edges, side="right")
    integral = below[k] + edges * above[k]
    mass = np.diff(integral) / float(s @ w)
    pmf = np.zeros(cells)
    pmf += 0.5 * mass
    pmf[1:] += 0.5 * mass[:-1]
    return pmf / pmf.sum()


def exponential_wait_pmf(p_wait: float, mean: float, h: float, cells: int) -> np.ndarray:
    """The heavy-traffic wait on a grid of step h: 0 with probability 1 - p_wait, else exponential,
    with the given mean (Kingman's heavy-traffic limit of the law above; mass past the grid dropped)."""
    pmf = np.zeros(cells)
    pmf[0] = 1.0 - p_wait
    if p_wait > 0 and mean > 0:
        scale = mean / p_wait
        cell = -np.diff(np.exp(-np.arange(cells) * h / scale))   # mass on [k h, (k+1) h)
        pmf[:-1] += 0.5 * p_wait * cell                          # split half to each end, as above
        pmf[1:] += 0.5 * p_wait * cell
    return pmf


def mg1_mean_wait(service_values: np.ndarray, service_weights: np.ndarray, rho: float, ca2: float = 1.0,
                  servers: int = 1) -> float:
    """Mean of the law above (for Little's law and the grid's extent)."""
    if rho >= 1:
        return math.inf
    s = np.asarray(service_values, dtype=float) / servers
    w = np.asarray(service_weights, dtype=float) / np.sum(service_weights)
    mean = float(s @ w)
    if mean <= 0 or rho <= 0:
        return 0.0
    residual = float((s ** 2) @ w) / (2 * mean)
    cs2 = max(0.0, float((s ** 2) @ w) / mean ** 2 - 1.0)
    wait = rho / (1 - rho) * (ca2 + cs2) / (1 + cs2) * residual
    return wait * (erlang_c(servers, servers * rho) / rho if servers > 1 else 1.0)


def infinite_server_dispersion(ca2: float) -> float:
    """Variance-to-mean ratio (peakedness) of the number busy in a G/M/inf system, (1 + ca2)/2.

    Running decodes form an infinite-server queue (every running sequence advances every step): with
    Poisson arrivals their number is Poisson; burstier arrivals spread it (Whitt's peakedness, exact for
    exponential service times; used here as the stated approximation for any output-length law).
    """
    return (1.0 + ca2) / 2.0


def compound_poisson_pmf(size: np.ndarray, mus: np.ndarray) -> np.ndarray:
    """P(X = n cells) for n = 0..len(size) - 1, one row per expected count in `mus`, X the sum of
    Poisson(mu) sizes whose law on the cell grid is `size` (mass past its last cell, if any, is left
    out, and the rows sum to less than 1): Panjer's recursion, f_0 = e^(-mu (1 - s_0)),
    f_n = mu / n sum_j j s_j f_(n-j)."""
    k = len(size) - 1
    f = np.zeros((len(mus), k + 1))
    f[:, 0] = np.exp(-np.asarray(mus) * (1.0 - size[0]))
    js = np.arange(1, k + 1) * size[1:]
    for n in range(1, k + 1):
        f[:, n] = mus / n * (f[:, n - 1::-1] @ js[:n])
    return f


class CappedArrivals:
    """E[min(r, X)] for X the sizes of Poisson(mu) arrivals (compound Poisson; module docstring), as a
    table over a geometric grid of mu and a grid of caps r, read by interpolation in mu."""

    MUS = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 61)])   # 1.26x apart: E moves smoothly in mu

    def __init__(self, sizes: np.ndarray, weights: np.ndarray, top: float, cells: int = 128) -> None:
        self.cell = max(1.0, top / cells)
        k = int(math.ceil(top / self.cell))
        w = np.asarray(weights, float) / np.sum(weights)
        at = np.maximum(1, np.round(np.asarray(sizes, float) / self.cell)).astype(int)
        s = np.bincount(np.minimum(at, k + 1), weights=w, minlength=k + 2)[: k + 1]   # sizes past k: defective
        survival = 1.0 - np.cumsum(compound_poisson_pmf(s, self.MUS), axis=1)    # P(X > c cells), c = 0..k
        self.below = np.concatenate([np.zeros((len(self.MUS), 1)), np.cumsum(survival, axis=1)], axis=1) * self.cell
        self.k = k

    def mean(self, mus: np.ndarray, caps: np.ndarray) -> np.ndarray:
        """E[min(cap, X)] for each (mu, cap) pair (caps up to the table's top)."""
        mus = np.clip(np.asarray(mus, float), 0.0, self.MUS[-1])
        cols = np.clip(np.asarray(caps, float) / self.cell, 0.0, self.k + 1)
        lo = np.minimum(cols.astype(int), self.k)
        frac = cols - lo
        hi = np.minimum(lo + 1, self.k + 1)
        i = np.clip(np.searchsorted(self.MUS, mus, side="right") - 1, 0, len(self.MUS) - 2)
        t = (mus - self.MUS[i]) / (self.MUS[i + 1] - self.MUS[i])
        at = [self.below[j, lo] * (1 - frac) + self.below[j, hi] * frac for j in (i, i + 1)]
        return at[0] * (1 - t) + at[1] * t
