"""What the cluster sources read from each workload kind (puller/daemon/sources.py), object by object: the images
of containers, init containers and image volumes of every pod template, with their node targeting, pull secrets
and pull policy. The same objects go through a real API server in test_kube.py."""

from __future__ import annotations

from puller.daemon.imagelist import KubeRef
from puller.daemon.sources import CRONJOBS, DAEMONSETS, DEPLOYMENTS, JOBS, PODS, STATEFULSETS, WORKLOADS, sources_for

POD = {
    "nodeSelector": {"gpu": "a100"},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccountName": "runner",
    "initContainers": [{"name": "init", "image": "reg.example/tools/init:1.0", "imagePullPolicy": "IfNotPresent"}],
    "containers": [{"name": "main", "image": "reg.example/app/main:2.0", "imagePullPolicy": "IfNotPresent"}],
    "volumes": [
        {"name": "runtime", "image": {"reference": "reg.example/ml/runtime:v5", "pullPolicy": "Always"}},
        {"name": "model", "image": {"reference": "reg.example/ml/model:latest"}},  # no policy: Always (latest)
        {"name": "scratch", "emptyDir": {}},
    ],
}
WANTED = {
    "reg.example/tools/init:1.0": False,
    "reg.example/app/main:2.0": False,
    "reg.example/ml/runtime:v5": True,
    "reg.example/ml/model:latest": True,
}


def _object(kind: str, spec: dict) -> dict:
    return {"kind": kind, "metadata": {"namespace": "ml", "name": "job", "uid": "u1"}, "spec": spec}


def test_every_workload_kind_gives_its_templates_containers_init_containers_and_image_volumes():
    template = {"template": {"spec": POD}}
    cases = [
        (DEPLOYMENTS, _object("Deployment", template)),
        (STATEFULSETS, _object("StatefulSet", template)),
        (DAEMONSETS, _object("DaemonSet", template)),
        (JOBS, _object("Job", template)),
        (CRONJOBS, _object("CronJob", {"schedule": "* * * * *", "jobTemplate": {"spec": template}})),
    ]
    for kind, obj in cases:
        specs = kind.specs(obj)
        assert {str(s.reference): s.always for s in specs} == WANTED, kind.name
        for s in specs:
            assert s.node_selector == (("gpu", "a100"),), kind.name
            assert s.pull_secrets == (KubeRef("Secret", "ml", "regcred"), KubeRef("ServiceAccount", "ml", "runner"))


def test_a_pod_gives_its_own_images_without_its_account():
    specs = PODS.specs(_object("Pod", POD))
    assert {str(s.reference): s.always for s in specs} == WANTED
    assert specs[0].pull_secrets == (KubeRef("Secret", "ml", "regcred"),)  # admission added the account's already


def test_malformed_workloads_give_what_they_can_and_never_fail():
    broken = [
        (JOBS, _object("Job", {"template": "not a mapping"})),
        (CRONJOBS, _object("CronJob", {"jobTemplate": None})),
        (
            STATEFULSETS,
            _object("StatefulSet", {"template": {"spec": {"volumes": ["x", {"image": 7}], "containers": 3}}}),
        ),
        (DAEMONSETS, _object("DaemonSet", {"template": {"spec": {"volumes": [{"image": {"reference": "a b"}}]}}})),
    ]
    for kind, obj in broken:
        assert kind.specs(obj) == [], kind.name
    partly = _object("Job", {"template": {"spec": {"containers": [{"image": "ok:1"}, {"image": "Bad Ref"}]}}})
    assert [str(s.reference) for s in JOBS.specs(partly)] == ["docker.io/library/ok:1"]


def test_a_digest_or_a_tag_other_than_latest_without_a_policy_is_not_always():
    spec = {"containers": [{"image": "a:1"}, {"image": "b"}, {"image": "c@sha256:" + "a" * 64}]}
    assert {str(s.reference).split("/")[-1]: s.always for s in PODS.specs(_object("Pod", spec))} == {
        "a:1": False,
        "b:latest": True,
        "c@sha256:" + "a" * 64: False,
    }


def test_the_workload_selector_watches_every_kind_in_each_namespace():
    sources = sources_for(False, "puller.io/prefetch=true", ["ml", "web"])
    assert [(s.kind.name, s.namespace) for s in sources] == [(k.name, n) for k in WORKLOADS for n in ("ml", "web")]
    assert {s.selector for s in sources} == {"puller.io/prefetch=true"}
