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
  # - update: a replace, in Enforce mode, when another field manager owns part of the object
  #   that apply cannot remove (a sidecar or an extra port added to a Deployment or Service, a
  #   label added inside a NetworkPolicy's selector, a container the spec dropped after someone
  #   forced a value into it); no more than patch already allows;
  # - delete: pruning what the stack no longer wants.
  - apiGroups: [""]
    resources: [serviceaccounts, configmaps, services]
    verbs: [get, list, watch, create, patch, update, delete]
  - apiGroups: [apps]
    resources: [deployments]
    verbs: [get, list, watch, create, patch, update, delete]
  - apiGroups: [policy]
    resources: [poddisruptionbudgets]
    verbs: [get, list, watch, create, patch, update, delete]
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
