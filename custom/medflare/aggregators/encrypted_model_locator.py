"""Model locator for an encrypted global model: NVFlare's ``PTFileModelLocator``, handing out ciphertexts as bytes.

Under secure aggregation the server's global model is CKKS ciphertexts
(:mod:`medflare.transport.ckks_update`). ``PTFileModelLocator`` returns them as TenSEAL
objects, which the server's task broadcast cannot copy without the secret key the server does
not have (NVFlare 2.9: "Failed to deep copy task.data for broadcast: ... the current context is
public"), so cross-site and global-model evaluation never send the global model. This locator
returns each ciphertext serialized (``bytes``), the form NVFlare's ``HEModelDecryptor`` reads
at the sites, and the server still never decrypts anything.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.he.homomorphic_encrypt import serialize_nested_dict
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator

__all__ = ["EncryptedModelLocator"]


class EncryptedModelLocator(PTFileModelLocator):
    """``PTFileModelLocator`` whose located models hold serialized ciphertexts.

    Args:
        pt_persistor_id: the job's ``PTFileModelPersistor`` (with NVFlare's ``HEModelSerializeFilter``).
    """

    def locate_model(self, model_name, fl_ctx: FLContext) -> DXO:
        dxo = super().locate_model(model_name, fl_ctx)
        if dxo is not None and isinstance(dxo.data, dict):
            serialize_nested_dict(dxo.data)
        return dxo
