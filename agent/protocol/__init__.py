"""The wire formats: the ONE definition, shared by model_tools, fleet_server and the agent.

Standard library only: importing this package imports neither ``cryptography`` (loaded by
:mod:`agent.protocol.signed` inside the functions that sign and verify) nor numpy.

Modules::

    manifest   the bundle manifest (manifest.json)
    profiles   device profiles (device_profiles/*.toml)
    topics     MQTT topic names and the ACL rule
    messages   MQTT messages (canonical JSON)
    signed     the signed desired-state envelope (Ed25519)

Errors (all ``ValueError``s, split by who is at fault)::

    ProtocolError                   root: data from outside is not what the format allows
    ├── ManifestError               a bundle manifest is malformed (its producer is at fault)
    ├── ProfileError                a device profile file is malformed (configuration)
    ├── UnknownProfileError         no profile of that name (also a LookupError)
    ├── TopicError                  a topic or device id is not ours (the peer)
    ├── MessageError                an MQTT message is malformed (the peer)
    ├── DesiredStateRejected        a desired-state envelope must not be applied
    │   ├── MalformedEnvelope       not the envelope shape, or the state inside is invalid
    │   ├── BadSignature            no valid signature by a trusted key
    │   ├── WrongDevice             signed for another device
    │   ├── ReplayedSequence        sequence not above the last applied one
    │   ├── NotYetValid             issued further ahead than the allowed clock skew
    │   └── Expired                 expires_at has passed
    └── KeyFormatError              a local key is not an Ed25519 key in PEM (configuration)

Misuse by the calling code (an argument out of range, an ``unrecognized`` mapping that holds a
known field) raises plain ``ValueError``/``TypeError`` instead.
"""

from agent.protocol._errors import ProtocolError
from agent.protocol.manifest import (
    Golden,
    Manifest,
    ManifestError,
    ModelFile,
    Tensor,
    TensorSpec,
    is_plain_name,
    sha256_file,
)
from agent.protocol.messages import (
    Ack,
    DesiredModel,
    DesiredState,
    DeviceMessage,
    DriftBatch,
    MessageError,
    Record,
    Reported,
    RunningModel,
    Status,
    TelemetryBatch,
    parse_device_message,
)
from agent.protocol.profiles import (
    DeviceProfile,
    ProfileError,
    Tolerances,
    UnknownProfileError,
    load_profiles,
    parse_profile,
)
from agent.protocol.signed import (
    BadSignature,
    DesiredStateRejected,
    Expired,
    KeyFormatError,
    MalformedEnvelope,
    NotYetValid,
    ReplayedSequence,
    WrongDevice,
    sign_desired,
    verify_desired,
)
from agent.protocol.topics import TopicError, may_access, parse_topic

__all__ = [
    "Ack",
    "BadSignature",
    "DesiredModel",
    "DesiredState",
    "DesiredStateRejected",
    "DeviceMessage",
    "DeviceProfile",
    "DriftBatch",
    "Expired",
    "Golden",
    "KeyFormatError",
    "MalformedEnvelope",
    "Manifest",
    "ManifestError",
    "MessageError",
    "ModelFile",
    "NotYetValid",
    "ProfileError",
    "ProtocolError",
    "Record",
    "ReplayedSequence",
    "Reported",
    "RunningModel",
    "Status",
    "TelemetryBatch",
    "Tensor",
    "TensorSpec",
    "Tolerances",
    "TopicError",
    "UnknownProfileError",
    "WrongDevice",
    "is_plain_name",
    "load_profiles",
    "may_access",
    "parse_device_message",
    "parse_profile",
    "parse_topic",
    "sha256_file",
    "sign_desired",
    "verify_desired",
]
