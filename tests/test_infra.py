"""Offline checks of the cluster and infrastructure files: cluster.yaml, infra/, and the runbook (docs/aws.md).

What this proves, without network access or a running Ray cluster:

* ``cluster.yaml`` passes Ray's own ``prepare_config`` and ``validate_config`` (the JSON
  schema that ``ray up`` applies). A guard makes any network connection fail while this runs.
  The head advertises ``CPU: 0``. There are two GPU worker types, on-demand and spot, with the
  same resources and node config but the market; both autoscale from 0 within ``max_workers``
  and have their own IAM instance profile. The setup commands ``pip install`` the repo that
  ``file_mounts`` copies from ``.``. Under moto's offline EC2 instance catalogue, the declared
  resources match what Ray itself would detect for those instance types.
* Every node starts Ray with ``RAY_AUTH_MODE=token`` and the token read from the stack's secret
  in the same shell line, joined by ``&&`` (no start without it); no token is written in the file;
  the dashboard binds to 127.0.0.1; every node type uses the stack's security group.
  (tests/test_auth.py runs those commands, quoted as Ray's launcher quotes them.)
* ``infra/pixelcnn-stack.yaml`` passes ``cfn-lint`` with no output. Its bucket is
  private, encrypted, denies non-TLS access and has lifecycle rules. Every IAM grant of S3
  actions is limited to that bucket, with no ``s3:*`` and no ``*`` resource. The head may pass
  only the worker role. The profile names agree with the ARNs in cluster.yaml. The token is a
  generated secret that only the head and worker roles may read (``GetSecretValue`` on its ARN,
  nothing else). The security group opens SSH only to the ``SshCidr`` parameter (no default, no
  0.0.0.0/0) and every other port only to its own members.
* The KubeRay RayJobs parse, shut down after the job, run no work on the head, request and
  tolerate ``nvidia.com/gpu``, use the same image as cluster.yaml and an IRSA service account
  (no keys), and turn on token authentication (``authOptions``). Their ``entrypoint`` equals the
  ``python jobs/...`` part of the matching ``ray job submit`` line in the runbook, docs/aws.md.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
STACK = REPO / "infra" / "pixelcnn-stack.yaml"
KUBERAY = {
    "train": REPO / "infra" / "kuberay" / "train-rayjob.yaml",
    "generate": REPO / "infra" / "kuberay" / "generate-rayjob.yaml",
}
# The job commands are read from the runbook.
RUNBOOK_SOURCE = REPO / "docs" / "aws.md"
RUNBOOK_HEADING = "# Runbook: from nothing to a million samples on AWS"
STACK_NAME = "pixelcnn"  # the --stack-name the runbook deploys with
BUCKET_ID = "ArtifactBucket"  # logical id of the project bucket in the template
SECRET_ID = "RayAuthToken"  # logical id of the Ray token's secret
SG_ID = "ClusterSecurityGroup"  # logical id of the cluster's security group
NODE_ROLES = {"HeadRole", "WorkerRole"}  # the only roles that may read the token
SG_PLACEHOLDER = "sg-0123456789abcdef0"  # cluster.yaml's security group id until the runbook replaces it


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def no_network(monkeypatch):
    """Make every IP connection or DNS lookup raise, so a hidden AWS call fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # No real credentials or config may be picked up either.
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def load_stack() -> dict:
    from cfnlint.decode import decode

    template, matches = decode(str(STACK))
    assert not matches, f"template does not parse: {matches}"
    assert template is not None
    return template


def load_rayjob(path: Path) -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"{path.name}: expected one RayJob, found {len(jobs)}"
    return jobs[0], docs


def gpu_worker_types(config: dict) -> dict[str, tuple[str, dict]]:
    """{'on-demand': (name, node type), 'spot': (name, node type)}: the two GPU worker types."""
    found: dict[str, list] = {"on-demand": [], "spot": []}
    for name, nt in config["available_node_types"].items():
        if name == config["head_node_type"] or nt.get("resources", {}).get("GPU", 0) <= 0:
            continue
        market = nt["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        found[market].append((name, nt))
    assert all(len(v) == 1 for v in found.values()), f"expected one on-demand and one spot GPU type: {found}"
    return {market: types[0] for market, types in found.items()}


def sub_stack_name(value) -> str:
    """A template value ``!Sub "${AWS::StackName}-..."`` as deployed under STACK_NAME."""
    assert isinstance(value, dict) and set(value) == {"Fn::Sub"}, value
    return value["Fn::Sub"].replace("${AWS::StackName}", STACK_NAME)


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def runbook_commands() -> dict[str, str]:
    """{'train': full line, 'generate': full line} from the runbook section of RUNBOOK_SOURCE."""
    text = RUNBOOK_SOURCE.read_text()
    assert RUNBOOK_HEADING in text, f"{RUNBOOK_SOURCE.name} has no section {RUNBOOK_HEADING!r}"
    section = text.split(RUNBOOK_HEADING, 1)[1]  # the whole runbook: its steps and the KubeRay part
    bash_blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S)
    found: dict[str, list[str]] = {"train": [], "generate": []}
    for block in bash_blocks:
        for line in block.splitlines():
            m = re.match(r"^ray job submit .* -- python jobs/(train|generate)\.py .*$", line)
            if m:
                found[m.group(1)].append(line.strip())
    for kind, lines in found.items():
        assert len(lines) == 1, f"expected one `ray job submit ... jobs/{kind}.py` line, got {lines}"
    return {kind: lines[0] for kind, lines in found.items()}


def entrypoint_of(line: str) -> str:
    return line.split(" -- ", 1)[1].strip()


def flag(command: str, name: str) -> str:
    tokens = command.split()
    return tokens[tokens.index(name) + 1]


# --------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_ray_validation_offline(no_network):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_cluster()
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # raises on any schema violation

    # The validator is live: the same config with an unknown field is rejected.
    broken = copy.deepcopy(config)
    broken["available_node_types"][config["head_node_type"]]["resourcez"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)

    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"

    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must not take training or sampling work"
    assert head["max_workers"] == 0
    assert "GPU" not in head["resources"]

    gpu_types = gpu_worker_types(config)
    for name, worker in gpu_types.values():
        assert worker["resources"]["GPU"] >= 1
        assert worker["resources"]["CPU"] >= worker["resources"]["GPU"]
        assert worker["min_workers"] == 0, f"{name}: GPU workers should scale down to zero"
        assert 0 <= worker["max_workers"] <= config["max_workers"], name
    # The spot type is the on-demand one at another price: same resources and node, only the market differs.
    (_, on_demand), (_, spot) = gpu_types["on-demand"], gpu_types["spot"]
    assert spot["resources"] == on_demand["resources"]
    assert {k: v for k, v in spot["node_config"].items() if k != "InstanceMarketOptions"} == on_demand["node_config"]
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    # As shipped one type is on (on-demand, as the quota advice in the runbook assumes), and the two
    # together never exceed the cluster's cap.
    assert on_demand["max_workers"] >= 1
    assert on_demand["max_workers"] + spot["max_workers"] <= config["max_workers"]
    worker = on_demand

    # Every node type declares its resources, so nothing needs an instance-type lookup.
    for node_type in config["available_node_types"].values():
        assert "CPU" in node_type["resources"]

    # Workers carry their own instance profile (the launcher's default goes to the head only).
    worker_arn = worker["node_config"]["IamInstanceProfile"]["Arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", worker_arn)
    head_arn = head["node_config"]["IamInstanceProfile"]["Arn"]
    assert head_arn != worker_arn

    # CUDA image whose Ray version equals the one this project pins.
    import ray

    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:") and image.endswith("-gpu"), image
    assert image.split(":")[1].split("-")[0] == ray.__version__

    # file_mounts copies this repo ("."), and the merged setup commands pip-install that path.
    mounted = [remote for remote, local in config["file_mounts"].items() if local in (".", "./")]
    assert len(mounted) == 1, config["file_mounts"]
    install = re.compile(rf"\bpip install (-e |--editable )?{re.escape(mounted[0])}/?(\s|$)")
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(cmd) for cmd in config[key]), (key, config[key])


def test_declared_resources_match_ec2_instance_types(no_network):
    """Ray's own AWS resource detection, run against moto's offline EC2 catalogue."""
    from moto import mock_aws
    from ray.autoscaler._private.aws import utils as aws_utils
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    config = load_cluster()
    bare = copy.deepcopy(config)
    for node_type in bare["available_node_types"].values():
        node_type.pop("resources", None)
    aws_utils.client_cache.cache_clear()
    aws_utils.resource_cache.cache_clear()
    try:
        with mock_aws():
            detected = AWSNodeProvider.fillout_available_node_types_resources(bare)
    finally:
        aws_utils.client_cache.cache_clear()
        aws_utils.resource_cache.cache_clear()

    for name, node_type in config["available_node_types"].items():
        declared = node_type["resources"]
        auto = detected["available_node_types"][name]["resources"]
        if name == config["head_node_type"]:
            assert auto.get("GPU", 0) == 0, "the head instance type should be CPU-only"
            continue
        assert declared["GPU"] == auto["GPU"], (name, declared, auto)
        assert declared["CPU"] == auto["CPU"], (name, declared, auto)
        for key in declared:
            if key.startswith("accelerator_type:"):
                assert key in auto, (name, key, auto)


def _token_fetch(command: str) -> str:
    """The secret name a command reads the token from: ``python -c '...get_secret_value...' secretsmanager
    <name> SecretString`` (the arguments keep the Python free of quotes, so it nests in any quoting)."""
    m = re.search(
        r"""RAY_AUTH_TOKEN="\$\(python -c (['"])import boto3, sys; print\(boto3\.client\(sys\.argv\[1\]\)"""
        r"""\.get_secret_value\(SecretId=sys\.argv\[2\]\)\[sys\.argv\[3\]\]\)\1 secretsmanager (\S+) SecretString\)\"""",
        command,
    )
    assert m, f"no token read from Secrets Manager in: {command}"
    return m.group(2)


def test_every_node_starts_ray_with_the_token_from_the_secret():
    config = load_cluster()
    text = CLUSTER_YAML.read_text()
    secret_name = sub_stack_name(load_stack()["Resources"][SECRET_ID]["Properties"]["Name"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if re.search(r"\bray start\b", c)]
        # Mode, token and `ray start` in one shell line, chained with && from the mode on: a failed read
        # starts nothing (never Ray without authentication), and `ray start` inherits both variables.
        links = [part.strip() for part in start[start.index("export RAY_AUTH_MODE=token"):].split("&&")]
        assert len(links) == 4, (key, start)
        assert links[0] == "export RAY_AUTH_MODE=token", (key, start)
        assert _token_fetch(links[1]) == secret_name and links[1].endswith(')"'), (key, start)
        assert links[2] == "export RAY_AUTH_TOKEN", (key, start)
        assert links[3].startswith("ray start ") and ";" not in links[3], (key, start)
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head.split() and "--dashboard-host=127.0.0.1" in head.split()
    assert "0.0.0.0" not in json.dumps(config), "nothing in cluster.yaml may listen on, or open to, every address"

    # Shells the launcher opens on a node read the same secret (setup command -> ~/.bashrc).
    (bashrc,) = [c for c in config["setup_commands"] if ".bashrc" in c]
    assert "export RAY_AUTH_MODE=token" in bashrc and _token_fetch(bashrc) == secret_name

    # No token in the file: RAY_AUTH_TOKEN is only ever set from a command, and no long random-looking
    # string (a pasted token) appears anywhere.
    assert all(m.startswith('"$(') for m in re.findall(r"RAY_AUTH_TOKEN=(\S{0,3})", text)), text
    assert not re.findall(r"[A-Za-z0-9]{32,}", text)
    assert "RAY_AUTH_TOKEN_PATH" not in text and "auth_token" not in text


def test_every_node_type_uses_the_stacks_security_group():
    config = load_cluster()
    groups = {name: nt["node_config"].get("SecurityGroupIds") for name, nt in config["available_node_types"].items()}
    assert set(map(tuple, groups.values())) == {(SG_PLACEHOLDER,)}, groups
    assert "ClusterSecurityGroupId" in load_stack()["Outputs"]


# --------------------------------------------------------------------------- CloudFormation


def test_stack_passes_cfn_lint():
    exe = Path(sys.executable).parent / "cfn-lint"
    assert exe.exists(), f"cfn-lint not installed next to {sys.executable}"
    proc = subprocess.run(
        [str(exe), "--", str(STACK)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.returncode,
        proc.stdout,
        proc.stderr,
    )


def test_bucket_is_private_encrypted_and_expires_checkpoints():
    template = load_stack()
    resources = template["Resources"]
    props = resources[BUCKET_ID]["Properties"]
    assert resources[BUCKET_ID]["Type"] == "AWS::S3::Bucket"
    assert props["BucketName"] == {"Ref": "BucketName"}

    block = props["PublicAccessBlockConfiguration"]
    for key in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"):
        assert block[key] is True, key

    sse = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert sse and all(
        r["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms", "aws:kms:dsse")
        for r in sse
    )
    assert props["OwnershipControls"]["Rules"][0]["ObjectOwnership"] == "BucketOwnerEnforced"

    rules = [r for r in props["LifecycleConfiguration"]["Rules"] if r["Status"] == "Enabled"]
    expiring = [r for r in rules if "ExpirationInDays" in r or "NoncurrentVersionExpiration" in r]
    assert expiring, "no lifecycle rule expires old checkpoints"
    assert any(
        r.get("Prefix") == "runs/" and r.get("ExpirationInDays") == {"Ref": "CheckpointRetentionDays"}
        for r in rules
    )
    assert any("AbortIncompleteMultipartUpload" in r for r in rules)
    assert {"BucketName", "CheckpointRetentionDays"} <= set(template["Parameters"])

    policy = next(
        r["Properties"]["PolicyDocument"]
        for r in resources.values()
        if r["Type"] == "AWS::S3::BucketPolicy"
    )
    assert any(
        s["Effect"] == "Deny"
        and s["Condition"]["Bool"]["aws:SecureTransport"] in ("false", False)
        for s in policy["Statement"]
    ), "bucket policy must deny non-TLS requests"

    assert {"BucketName", "HeadInstanceProfileArn", "WorkerInstanceProfileArn"} <= set(
        template["Outputs"]
    )


def _permission_statements(resources: dict):
    """(resource logical id, statement) for every identity-policy statement in the template."""
    for rid, res in resources.items():
        props = res.get("Properties", {})
        docs = []
        if res["Type"] in ("AWS::IAM::ManagedPolicy", "AWS::IAM::Policy"):
            docs.append(props["PolicyDocument"])
        if res["Type"] in ("AWS::IAM::Role", "AWS::IAM::User", "AWS::IAM::Group"):
            docs += [p["PolicyDocument"] for p in props.get("Policies", [])]
        for doc in docs:
            for statement in as_list(doc["Statement"]):
                yield rid, statement


def _is_project_bucket(resource) -> bool:
    if resource == {"Fn::GetAtt": [BUCKET_ID, "Arn"]}:
        return True
    if isinstance(resource, dict) and set(resource) == {"Fn::Sub"}:
        sub = resource["Fn::Sub"]
        return isinstance(sub, str) and re.fullmatch(rf"\$\{{{BUCKET_ID}\.Arn\}}(/.*)?", sub) is not None
    return False


def test_iam_s3_access_is_limited_to_the_project_bucket():
    template = load_stack()
    resources = template["Resources"]
    granted: dict[str, list] = {}
    s3_statements = 0
    for rid, statement in _permission_statements(resources):
        assert statement["Effect"] in ("Allow", "Deny")
        if statement["Effect"] != "Allow":
            continue
        assert "NotAction" not in statement and "NotResource" not in statement, rid
        actions = [a.lower() for a in as_list(statement["Action"])]
        assert "*" not in actions and "s3:*" not in actions, (rid, statement)
        s3_actions = [a for a in actions if a.startswith("s3:")]
        if not s3_actions:
            continue
        s3_statements += 1
        for resource in as_list(statement["Resource"]):
            assert resource != "*" and _is_project_bucket(resource), (rid, resource)
            for action in s3_actions:
                granted.setdefault(action, []).append(resource)
    assert s3_statements >= 2

    bucket_arn = {"Fn::GetAtt": [BUCKET_ID, "Arn"]}
    assert bucket_arn in granted["s3:listbucket"]
    for action in ("s3:getobject", "s3:putobject", "s3:deleteobject", "s3:abortmultipartupload"):
        assert {"Fn::Sub": f"${{{BUCKET_ID}.Arn}}/*"} in granted[action], action

    # Workers get the bucket policy and nothing else. The head may pass only the worker role.
    worker = resources["WorkerRole"]["Properties"]
    assert worker["ManagedPolicyArns"] == [{"Ref": "BucketAccessPolicy"}, {"Ref": "RayAuthTokenReadPolicy"}]
    assert not worker.get("Policies")
    head = resources["HeadRole"]["Properties"]
    assert {"Ref": "BucketAccessPolicy"} in head["ManagedPolicyArns"]
    pass_role = [
        s
        for _, s in _permission_statements({"HeadRole": resources["HeadRole"]})
        if "iam:passrole" in [a.lower() for a in as_list(s["Action"])]
    ]
    assert pass_role and all(
        as_list(s["Resource"]) == [{"Fn::GetAtt": ["WorkerRole", "Arn"]}] for s in pass_role
    )


def test_instance_profiles_match_cluster_yaml():
    template = load_stack()
    resources = template["Resources"]
    config = load_cluster()
    head = config["available_node_types"][config["head_node_type"]]

    def profile_arn_suffix(logical_id: str, role_id: str) -> str:
        props = resources[logical_id]["Properties"]
        assert props["Roles"] == [{"Ref": role_id}]
        name = props["InstanceProfileName"]["Fn::Sub"].replace("${AWS::StackName}", STACK_NAME)
        return f":instance-profile/{name}"

    assert head["node_config"]["IamInstanceProfile"]["Arn"].endswith(
        profile_arn_suffix("HeadInstanceProfile", "HeadRole")
    )
    for name, worker in gpu_worker_types(config).values():
        assert worker["node_config"]["IamInstanceProfile"]["Arn"].endswith(
            profile_arn_suffix("WorkerInstanceProfile", "WorkerRole")
        ), name
    # The head may only stop or terminate instances tagged with this cluster's name.
    assert template["Parameters"]["ClusterName"]["Default"] == config["cluster_name"]


def test_the_token_is_a_generated_secret_only_the_node_roles_may_read():
    template = load_stack()
    resources = template["Resources"]
    secrets_ = [rid for rid, r in resources.items() if r["Type"] == "AWS::SecretsManager::Secret"]
    assert secrets_ == [SECRET_ID]
    props = resources[SECRET_ID]["Properties"]
    assert "SecretString" not in props, "the token must be generated, never written in the template"
    generated = props["GenerateSecretString"]
    assert generated["PasswordLength"] >= 32 and "SecretStringTemplate" not in generated
    # Generated, not passed in: no parameter carries a token.
    assert not [p for p in template["Parameters"] if "token" in p.lower() or "secret" in p.lower()]

    # Every grant of a secretsmanager action: GetSecretValue on that secret's ARN only, from policies
    # attached to the head and worker roles and nothing else.
    granting = set()
    for rid, statement in _permission_statements(resources):
        actions = [a.lower() for a in as_list(statement.get("Action", []))]
        if not any(a.startswith("secretsmanager:") or a == "*" for a in actions):
            continue
        assert statement["Effect"] == "Allow" and "NotResource" not in statement, (rid, statement)
        assert actions == ["secretsmanager:getsecretvalue"], (rid, statement)
        assert as_list(statement["Resource"]) == [{"Ref": SECRET_ID}], (rid, statement)
        granting.add(rid)
    assert granting, "no policy lets the nodes read the token"
    for rid in granting:
        policy = resources[rid]
        assert policy["Type"] == "AWS::IAM::ManagedPolicy", (rid, "inline grants would hide who holds them")
        assert not {"Roles", "Users", "Groups"} & set(policy["Properties"]), rid
        holders = {
            other for other, r in resources.items()
            if {"Ref": rid} in r.get("Properties", {}).get("ManagedPolicyArns", [])
        }
        assert holders == NODE_ROLES, (rid, holders)
    # No resource policy opens the secret to anyone else.
    for rid, r in resources.items():
        if r["Type"] == "AWS::SecretsManager::ResourcePolicy":
            for statement in as_list(r["Properties"]["ResourcePolicy"]["Statement"]):
                assert statement["Effect"] == "Deny", (rid, statement)

    outputs = template["Outputs"]
    assert outputs["RayAuthTokenSecretArn"]["Value"] == {"Ref": SECRET_ID}
    assert sub_stack_name(outputs["RayAuthTokenSecretName"]["Value"]) == sub_stack_name(props["Name"])


def _ingress_rules(resources: dict):
    """(rule, where) for every ingress rule of the cluster's security group: inline and standalone."""
    for rule in resources[SG_ID]["Properties"].get("SecurityGroupIngress", []):
        yield rule, SG_ID
    for rid, r in resources.items():
        if r["Type"] == "AWS::EC2::SecurityGroupIngress":
            yield r["Properties"], rid


def _is_cluster_group(value) -> bool:
    return value in ({"Ref": SG_ID}, {"Fn::GetAtt": [SG_ID, "GroupId"]})


def test_security_group_opens_ssh_to_the_cidr_parameter_and_the_rest_to_members_only():
    template = load_stack()
    resources, params = template["Resources"], template["Parameters"]
    groups = [rid for rid, r in resources.items() if r["Type"] == "AWS::EC2::SecurityGroup"]
    assert groups == [SG_ID]
    assert params["VpcId"]["Type"] == "AWS::EC2::VPC::Id"
    assert resources[SG_ID]["Properties"]["VpcId"] == {"Ref": "VpcId"}

    # SshCidr has no default (every deploy names its own) and refuses the whole internet.
    ssh_cidr = params["SshCidr"]
    assert "Default" not in ssh_cidr
    pattern = re.compile(ssh_cidr["AllowedPattern"])
    for good in ("203.0.113.7/32", "10.0.0.0/16", "192.168.1.0/24"):
        assert pattern.fullmatch(good), good
    for bad in ("0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/4", "203.0.113.7", "::/0", "300.1.1.1/32"):
        assert not pattern.fullmatch(bad), bad

    values = json.dumps([template["Resources"], template["Parameters"]])  # the template's values, not its comments
    assert "0.0.0.0/0" not in values and "::/0" not in values
    ssh, members = [], []
    for rule, where in _ingress_rules(resources):
        assert "CidrIpv6" not in rule and "SourcePrefixListId" not in rule, (where, rule)
        if where != SG_ID:
            assert _is_cluster_group(rule["GroupId"]), (where, rule)
        if "CidrIp" in rule:
            # The one rule open to addresses outside the group: SSH, from the parameter.
            assert rule["CidrIp"] == {"Ref": "SshCidr"}, (where, rule)
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), (where, rule)
            ssh.append(rule)
        else:
            # Everything else (Ray's ports, NCCL, the head's SSH to workers) only from the group's own members.
            assert _is_cluster_group(rule.get("SourceSecurityGroupId")), (where, rule)
            assert "SourceSecurityGroupOwnerId" not in rule, (where, rule)
            members.append(rule)
    assert len(ssh) == 1 and len(members) >= 1
    assert "ClusterSecurityGroupId" in template["Outputs"]


# --------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("kind", ["train", "generate"])
def test_kuberay_rayjob(kind):
    job, docs = load_rayjob(KUBERAY[kind])
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert re.fullmatch(r"(s3|gs|https?)://\S+\.zip", runtime_env["working_dir"])

    cluster = spec["rayClusterSpec"]
    image = load_cluster()["docker"]["image"]
    # Token authentication: KubeRay >= 1.5.1 generates the token into a Secret and sets RAY_AUTH_MODE and
    # RAY_AUTH_TOKEN on every Ray container and on the submitter (needs rayVersion >= 2.52).
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    env_names = {e["name"] for pod_ in pods for c in pod_["containers"] for e in c.get("env", [])}
    assert not env_names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, "the operator sets them"
    assert not re.findall(r"[A-Za-z0-9]{32,}", KUBERAY[kind].read_text()), "no token in the manifest"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_pod = head["template"]["spec"]
    for container in head_pod["containers"]:
        assert container["image"] == image
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})

    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if any(
            int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert len(gpu_groups) == 1
    group = gpu_groups[0]
    pod = group["template"]["spec"]
    assert any(
        t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
        for t in pod.get("tolerations", [])
    )
    assert all(c["image"] == image for c in pod["containers"])
    gpus_per_pod = sum(int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in pod["containers"])
    # /dev/shm beyond Kubernetes' 64 MiB, for Ray's object store and NCCL between one pod's GPUs.
    for spec_ in (head_pod, pod):
        shm = [v["name"] for v in spec_.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert all(any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in c.get("volumeMounts", []))
                   for c in spec_["containers"])

    # S3 access through IRSA: one service account, annotated with a role, no keys anywhere.
    accounts = {head_pod.get("serviceAccountName"), pod.get("serviceAccountName")}
    assert len(accounts) == 1 and None not in accounts
    service_accounts = [d for d in docs if d.get("kind") == "ServiceAccount"]
    assert [sa["metadata"]["name"] for sa in service_accounts] == list(accounts)
    assert "eks.amazonaws.com/role-arn" in service_accounts[0]["metadata"]["annotations"]
    text = KUBERAY[kind].read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    stack = load_stack()
    assert stack["Parameters"]["KubernetesServiceAccount"]["Default"] in accounts

    # The GPUs the job asks for fit in the worker group.
    capacity = gpus_per_pod * group["maxReplicas"]
    entry = spec["entrypoint"]
    if kind == "train":
        assert "--use-gpu" in entry.split() and int(flag(entry, "--num-workers")) <= capacity
        assert 1 <= int(flag(entry, "--min-workers")) <= int(flag(entry, "--num-workers"))
    else:
        assert int(flag(entry, "--num-actors")) * int(flag(entry, "--gpus-per-actor")) <= capacity


@pytest.mark.parametrize("kind", ["train", "generate"])
def test_kuberay_entrypoint_matches_readme_command(kind):
    lines = runbook_commands()
    job, _ = load_rayjob(KUBERAY[kind])
    assert job["spec"]["entrypoint"] == entrypoint_of(lines[kind])
    assert entrypoint_of(lines[kind]).startswith(f"python jobs/{kind}.py ")


def test_readme_generate_reads_the_checkpoint_train_writes():
    lines = runbook_commands()
    train, generate = entrypoint_of(lines["train"]), entrypoint_of(lines["generate"])
    storage, name = flag(train, "--storage").rstrip("/"), flag(train, "--name")
    assert flag(generate, "--checkpoint").rstrip("/") == f"{storage}/{name}"
    assert flag(generate, "--output").startswith("s3://")
    for line in lines.values():
        assert "--address http://127.0.0.1:8265" in line and "--working-dir ." in line


def test_irsa_trust_policy_is_valid_json_scoped_to_the_service_account():
    template = load_stack()
    role = template["Resources"]["IrsaRole"]
    assert role["Condition"] == "CreateIrsaRole"
    body = re.sub(r"\$\{[^}]+\}", "X", role["Properties"]["AssumeRolePolicyDocument"]["Fn::Sub"])
    trust = json.loads(body)
    (statement,) = trust["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    raw = role["Properties"]["AssumeRolePolicyDocument"]["Fn::Sub"]
    assert "system:serviceaccount:${KubernetesNamespace}:${KubernetesServiceAccount}" in raw
