"""The SASS reader used to find waits that share a global load's scoreboard (kernels/sass_check.py)."""

from wsimamba.kernels import sass_check as sc

# two instructions as cuobjdump printed them for the LB forward (Triton 3.6, sm_90): a global load that sets
# write barrier 4, and an FMA 20 instructions later that waits on barrier 4 for a shared-memory read
REAL = """\
        /*61d0*/               @P1 LDG.E.128 R68, desc[UR16][R84.64] ;                         /* 0x0000001054441981 */
                                                                                               /* 0x000722000c1e1d00 */
        /*6310*/                   FFMA R56, R153, R77, R230 ;                                 /* 0x0000004d99387223 */
                                                                                               /* 0x010fc600000000e6 */
"""


def _line(addr, text, wr=sc.NO_BARRIER, rd=sc.NO_BARRIER, wait=0, stall=2):
    ctrl = stall | (wr << 5) | (rd << 8) | (wait << 11)
    return (f"        /*{addr:04x}*/                   {text} ;                /* 0x{0x1234:016x} */\n"
            f"                                                                   /* 0x{ctrl << 41:016x} */\n")


def _loop(waiter_waits):
    # a loop of 5 instructions: a global load on barrier 2, a shared-memory read on barrier 2 or 3, an FMA reading
    # only the shared-memory result, the load's consumer, and the branch back
    lds_barrier = 2 if waiter_waits == 2 else 3
    text = "".join([
        _line(0x00, "MOV R1, R2"),
        _line(0x10, "LDG.E.128 R60, desc[UR4][R20.64]", wr=2),
        _line(0x20, "LDS.128 R8, [R30]", wr=lds_barrier),
        _line(0x30, "FFMA R1, R8, R9, R10", wait=1 << waiter_waits),
        _line(0x40, "FADD R2, R60, R1", wait=1 << 2),
        _line(0x50, "BRA 0x10"),
        _line(0x60, "EXIT"),
    ])
    return sc.loop_body(sc.parse_sass(text))


def test_control_bits_of_real_instructions():
    load, fma = sc.parse_sass(REAL)
    assert load.op == "LDG.E.128" and load.write_barrier == 4 and load.wait_mask == 0
    assert fma.op == "FFMA" and fma.waits_on(4) and fma.write_barrier == sc.NO_BARRIER


def test_a_wait_on_the_loads_barrier_before_its_consumer_is_found():
    body = _loop(waiter_waits=2)
    assert [x.addr for x in body] == [0x10, 0x20, 0x30, 0x40, 0x50]  # the loop, not the code around it
    (k, load, distance, waiter), = sc.shared_scoreboard_waits(body)
    assert load.op.startswith("LDG") and waiter.text.startswith("FFMA") and distance == 2


def test_a_wait_on_another_barrier_is_not():
    assert sc.shared_scoreboard_waits(_loop(waiter_waits=3)) == []
    assert sc.instruction_mix(_loop(waiter_waits=3))["LDG"] == 1


def test_a_vector_store_of_the_loaded_value_is_its_consumer():
    # the load fills R61 alone; a 16-byte store of R60..R63 reads it, so its wait is the load's own
    text = "".join([
        _line(0x00, "LDG.E R61, desc[UR4][R20.64]", wr=1),
        _line(0x10, "STS.128 [R8], R60", wait=1 << 1),
        _line(0x20, "BRA 0x0"),
    ])
    assert sc.shared_scoreboard_waits(sc.loop_body(sc.parse_sass(text))) == []
