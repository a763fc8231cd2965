import pytest

BOTH = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)

@BOTH
def test_probe(chain):
    pc = chain.PaymentChannels
    fn = pc.functions.open(chain.addr("buyer"), "0x" + "00"*20, "0x" + "00"*20, 0, 0)
    for how in ("call", "transact"):
        try:
            getattr(fn, how)({"from": chain.addr("buyer")})
        except Exception as e:
            print(how, type(e).__mro__, repr(e), getattr(e, "data", None))
    fn = pc.functions.open(chain.addr("seller"), "0x" + "00"*20, "0x" + "00"*20, 5, 0)
    h = fn.transact({"from": chain.addr("buyer"), "value": 5, "gas": 300000})
    r = chain.w3.eth.wait_for_transaction_receipt(h)
    print(r["status"], r["gasUsed"], r.get("effectiveGasPrice"))
    fn = pc.functions.open(chain.addr("buyer"), "0x" + "00"*20, "0x" + "00"*20, 5, 0)
    try:
        h = fn.transact({"from": chain.addr("seller"), "value": 5, "gas": 300000})
        r = chain.w3.eth.wait_for_transaction_receipt(h)
        print("mined", r["status"])
    except Exception as e:
        print("explicit gas", type(e), repr(e), getattr(e, "data", None))
    print(chain.w3.eth.chain_id, chain.w3.eth.get_block("latest")["baseFeePerGas"])
