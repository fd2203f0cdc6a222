{{/*
The rules of everything the operator does inside the namespaces it serves: the ClusterRole's
when it serves every namespace, each watched namespace's Role when operator.watchNamespaces is
set (templates/clusterrole.yaml, templates/namespace-roles.yaml).
*/}}
{{- define "opsconductor-operator.namespacedRules" }}
  # The custom resource: the controller lists and watches the OpsConductorStacks
  # (controller::run, over the scope of --watch-namespaces). It never writes a stack's spec.
  - apiGroups: [opsconductor.io]
    resources: [opsconductorstacks]
    verbs: [list, watch]
  # Status: written with server-side apply (reconcile::write_status, patch_status).
  - apiGroups: [opsconductor.io]
    resources: [opsconductorstacks/status]
    verbs: [patch]
  # The objects a stack consists of (controller/apply.rs), in the stack's namespace:
  # - list, watch: the label-filtered watch caches (over the scope, like the stacks);
  # - get: a re-read when the cache lags behind the operator's own last write;
  # - create, patch: server-side apply (an apply that creates the object also needs create);
  # - delete: pruning what the stack no longer wants.
  - apiGroups: [""]
    resources: [serviceaccounts, configmaps, services]
    verbs: [get, list, watch, create, patch, delete]
  - apiGroups: [apps]
    resources: [deployments]
    verbs: [get, list, watch, create, patch, delete]
  - apiGroups: [policy]
    resources: [poddisruptionbudgets]
    verbs: [get, list, watch, create, patch, delete]
  # NetworkPolicies as above, plus update: when another field manager added something inside a
  # policy that must be exactly the operator's, apply cannot remove it and a replace does.
  - apiGroups: [networking.k8s.io]
    resources: [networkpolicies]
    verbs: [get, list, watch, create, patch, update, delete]
  # Events about stacks (kube's Recorder: events.k8s.io/v1, create, then patch for a series).
  - apiGroups: [events.k8s.io]
    resources: [events]
    verbs: [create, patch]
  # Certificates (src/acme/, docs/acme.md), in the stack's namespace:
  # - get: the user's own certificate (spec.tls.secretName), <stack>-tls and
  #   <stack>-acme-account, the EAB key and CA bundle Secrets the stack references;
  # - create, patch: <stack>-tls by server-side apply (the bootstrap certificate, then the
  #   issued one);
  # - create, update: <stack>-acme-account (created, or replaced when it held another CA's
  #   account).
  # No list or watch. RBAC cannot narrow this to the stacks' Secret names.
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get, create, update, patch]
  # The violation audit (src/controller/stores.rs, src/audit/): everything in a stack's namespace
  # that could open a way in around the gateway, watched over the scope like the stacks.
  # Services and NetworkPolicies are granted above.
  - apiGroups: [""]
    resources: [pods]
    verbs: [list, watch]
  - apiGroups: [networking.k8s.io]
    resources: [ingresses]
    verbs: [list, watch]
  # Gateway API routes, when the API server serves them (found by discovery at startup).
  - apiGroups: [gateway.networking.k8s.io]
    resources: [httproutes, grpcroutes, tlsroutes, tcproutes, udproutes]
    verbs: [list, watch]
{{- end }}
