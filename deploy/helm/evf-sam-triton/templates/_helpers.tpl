{{- define "evf-sam-triton.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "evf-sam-triton.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "evf-sam-triton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "evf-sam-triton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "evf-sam-triton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "evf-sam-triton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "evf-sam-triton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "evf-sam-triton.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The workload the HPA and the PDB act on: our Deployment, or the one KServe creates. */}}
{{- define "evf-sam-triton.workloadName" -}}
{{- if eq .Values.mode "kserve" -}}
{{- printf "%s-predictor" (include "evf-sam-triton.fullname" .) -}}
{{- else -}}
{{- include "evf-sam-triton.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "evf-sam-triton.podSelector" -}}
{{- if eq .Values.mode "kserve" -}}
serving.kserve.io/inferenceservice: {{ include "evf-sam-triton.fullname" . }}
{{- else -}}
{{ include "evf-sam-triton.selectorLabels" . }}
{{- end -}}
{{- end -}}

{{/* Stop budget: the proxies notice the endpoint is gone, the replica drains (preStop), then
tritonserver's own exit after SIGTERM (at most triton.exitTimeoutSeconds, under the 30 s margin). */}}
{{- define "evf-sam-triton.terminationGracePeriodSeconds" -}}
{{- add .Values.routing.endpointRemovalDelaySeconds .Values.routing.replicaDrainTimeoutSeconds 30 -}}
{{- end -}}

{{- define "evf-sam-triton.checks" -}}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) -}}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if ge (int .Values.triton.exitTimeoutSeconds) 30 -}}
{{- fail (printf "triton.exitTimeoutSeconds (%d) must stay under the 30 s margin of terminationGracePeriodSeconds" (int .Values.triton.exitTimeoutSeconds)) -}}
{{- end -}}
{{- if and (eq .Values.mode "kserve") (.Values.istio.enabled) -}}
{{- fail "istio.enabled applies to mode: deployment (KServe creates its own Service)" -}}
{{- end -}}
{{- if and (eq .Values.mode "kserve") (ne .Values.modelRepository.source "pvc") -}}
{{- fail "mode: kserve fetches the repository through kserve.storageUri; set modelRepository.source: pvc" -}}
{{- end -}}
{{- end -}}

{{/*
preStop: wait for the proxies to drop the endpoint, then until nothing is inside the pipeline
(started - finished + pending, twice in a row; as serving/server.py drains), at most the drain budget.
*/}}
{{- define "evf-sam-triton.preStop" -}}
exec:
  command:
    - python3
    - -c
    - |
      import re, time, urllib.request
      time.sleep({{ .Values.routing.endpointRemovalDelaySeconds }})
      url = "http://127.0.0.1:{{ .Values.triton.ports.metrics }}/metrics"
      def total(text, name):
          return sum(float(m.group(1)) for m in re.finditer(r"^" + name + r"(?:\{[^}]*\})?\s+(\S+)", text, re.M))
      deadline, idle = time.time() + {{ .Values.routing.replicaDrainTimeoutSeconds }}, 0
      while time.time() < deadline and idle < 2:
          try:
              text = urllib.request.urlopen(url, timeout=2).read().decode()
          except OSError:
              break
          busy = total(text, "{{ .Values.drain.startedMetric }}") - total(text, "{{ .Values.drain.finishedMetric }}") + total(text, "{{ .Values.drain.pendingMetric }}")
          idle = idle + 1 if busy <= 0 else 0
          time.sleep(0.5)
{{- end -}}

{{/* The Triton container, shared by the Deployment and the KServe predictor. Context: dict with
"root" (the chart's .) and "modelDir" (where the repository is mounted). */}}
{{- define "evf-sam-triton.tritonContainer" -}}
{{- $v := .root.Values -}}
image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- /* Explicit, so that a KServe runtime's own command line does not replace the image's script. */}}
command: ["/usr/local/bin/evf-sam-tritonserver"]
args:
  - --exit-timeout-secs={{ $v.triton.exitTimeoutSeconds }}
  {{- with $v.triton.extraArgs }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
env:
  - name: TRITON_MODEL_REPOSITORY
    value: {{ .modelDir | quote }}
  - name: TRITON_HTTP_ADDRESS
    value: "0.0.0.0"
  - name: TRITON_GRPC_ADDRESS
    value: "0.0.0.0"
  - name: TRITON_METRICS_ADDRESS
    value: "0.0.0.0"
  - name: TRITON_HTTP_PORT
    value: {{ $v.triton.ports.http | quote }}
  - name: TRITON_GRPC_PORT
    value: {{ $v.triton.ports.grpc | quote }}
  - name: TRITON_METRICS_PORT
    value: {{ $v.triton.ports.metrics | quote }}
  {{- if $v.triton.adminKeySecret.name }}
  - name: TRITON_ADMIN_KEY
    valueFrom:
      secretKeyRef:
        name: {{ $v.triton.adminKeySecret.name }}
        key: {{ $v.triton.adminKeySecret.key }}
  {{- end }}
ports:
  - name: http
    containerPort: {{ $v.triton.ports.http }}
    protocol: TCP
  - name: grpc
    containerPort: {{ $v.triton.ports.grpc }}
    protocol: TCP
  - name: metrics
    containerPort: {{ $v.triton.ports.metrics }}
    protocol: TCP
startupProbe:
  httpGet:
    path: /v2/health/ready
    port: http
  periodSeconds: {{ $v.probes.startupPeriodSeconds }}
  timeoutSeconds: {{ $v.probes.timeoutSeconds }}
  failureThreshold: {{ div $v.probes.startupBudgetSeconds $v.probes.startupPeriodSeconds }}
readinessProbe:
  httpGet:
    path: /v2/health/ready
    port: http
  periodSeconds: {{ $v.probes.readinessPeriodSeconds }}
  timeoutSeconds: {{ $v.probes.timeoutSeconds }}
  failureThreshold: {{ $v.probes.readinessFailureThreshold }}
livenessProbe:
  httpGet:
    path: /v2/health/live
    port: http
  periodSeconds: {{ $v.probes.livenessPeriodSeconds }}
  timeoutSeconds: {{ $v.probes.timeoutSeconds }}
  failureThreshold: {{ $v.probes.livenessFailureThreshold }}
lifecycle:
  preStop:
    {{- include "evf-sam-triton.preStop" .root | nindent 4 }}
resources:
  requests:
    {{- toYaml $v.resources.requests | nindent 4 }}
    nvidia.com/gpu: {{ $v.gpusPerReplica }}
  limits:
    {{- toYaml $v.resources.limits | nindent 4 }}
    nvidia.com/gpu: {{ $v.gpusPerReplica }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
{{- end -}}

{{- define "evf-sam-triton.podCommon" -}}
{{- $v := .Values -}}
serviceAccountName: {{ include "evf-sam-triton.serviceAccountName" . }}
automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
terminationGracePeriodSeconds: {{ include "evf-sam-triton.terminationGracePeriodSeconds" . }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $v.spreadAcrossNodes }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "evf-sam-triton.podSelector" . | nindent 14 }}
{{- end }}
{{- end -}}
