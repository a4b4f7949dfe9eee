"""What the planner's laws leave out is said in the plan, not silently planned around."""
def test_the_plan_warns_when_decode_workers_prefill_what_it_counts_on_the_prefill_pool():
    """disagg-70b-h100's prompts are ~92% cached: pd_pair prefills most of them on the decode worker
    (under 512 uncached tokens), which the laws do not cost; the plan must say so, not stay silent."""
    import msgspec

    from emulator.planner import context
    from emulator.planner.api import unmodelled
    from emulator.spec import load_spec
    from loadtests.planner_bridge import planner_inputs
    spec = load_spec("disagg-70b-h100")
    request, workload, _, _ = planner_inputs(spec)
    assert request.local_prefill_tokens == 512
    warning = unmodelled(context.build(request, workload, spec.catalog_data()))
    assert len(warning) == 1 and "conditional disaggregation" in warning[0]
    share = int(warning[0].split("%")[0])
    assert 80 <= share <= 95
    off = msgspec.structs.replace(request, local_prefill_tokens=0)
    assert unmodelled(context.build(off, workload, spec.catalog_data())) == []
