// Package deploy_test checks the Kubernetes manifests: each decodes
// strictly into the real API types (k8s.io/api), their references agree
// (labels, ports, names), the server accepts the flags they pass, and the
// shutdown timing covers the drain.
package deploy_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/sbora-serve/sbora-serve/internal/testutil"
)

// inferencePool mirrors inference.networking.k8s.io/v1 InferencePool
// (its Go module is not available to this build): strict decoding into it
// catches misspelt or misplaced fields, and the required ones are checked.
type inferencePool struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace,omitempty"`
		Labels    map[string]string `json:"labels,omitempty"`
	} `json:"metadata"`
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		TargetPorts []struct {
			Number int32 `json:"number"`
		} `json:"targetPorts"`
		AppProtocol       string `json:"appProtocol,omitempty"`
		EndpointPickerRef struct {
			Group *string `json:"group,omitempty"`
			Kind  string  `json:"kind,omitempty"`
			Name  string  `json:"name"`
			Port  *struct {
				Number int32 `json:"number"`
			} `json:"port,omitempty"`
			FailureMode string `json:"failureMode,omitempty"`
		} `json:"endpointPickerRef"`
	} `json:"spec"`
}

type manifests struct {
	deployment *appsv1.Deployment
	service    *corev1.Service
	pvcs       []*corev1.PersistentVolumeClaim
	hpa        *autoscalingv2.HorizontalPodAutoscaler
	pool       *inferencePool
}

func load(t *testing.T) manifests {
	t.Helper()
	files, _ := filepath.Glob("kubernetes/*.yaml")
	if len(files) == 0 {
		t.Fatal("no manifests")
	}
	var m manifests
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			var head struct{ APIVersion, Kind string }
			if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
				t.Fatalf("%s #%d: %v", f, i, err)
			}
			strict := func(v any) {
				if err := yaml.UnmarshalStrict([]byte(doc), v); err != nil {
					t.Fatalf("%s #%d (%s): %v", f, i, head.Kind, err)
				}
			}
			switch head.APIVersion + " " + head.Kind {
			case "apps/v1 Deployment":
				m.deployment = &appsv1.Deployment{}
				strict(m.deployment)
			case "v1 Service":
				m.service = &corev1.Service{}
				strict(m.service)
			case "v1 PersistentVolumeClaim":
				p := &corev1.PersistentVolumeClaim{}
				strict(p)
				m.pvcs = append(m.pvcs, p)
			case "autoscaling/v2 HorizontalPodAutoscaler":
				m.hpa = &autoscalingv2.HorizontalPodAutoscaler{}
				strict(m.hpa)
			case "inference.networking.k8s.io/v1 InferencePool":
				m.pool = &inferencePool{}
				strict(m.pool)
			default:
				t.Fatalf("%s #%d: unexpected %s %s", f, i, head.APIVersion, head.Kind)
			}
		}
	}
	if m.deployment == nil || m.service == nil || m.hpa == nil || m.pool == nil || len(m.pvcs) != 2 {
		t.Fatalf("missing manifests: %+v", m)
	}
	return m
}

func subset(small, big map[string]string) bool {
	for k, v := range small {
		if big[k] != v {
			return false
		}
	}
	return len(small) > 0
}

func TestManifests(t *testing.T) {
	m := load(t)
	d := m.deployment
	pod := d.Spec.Template
	labels := pod.Labels
	if !subset(d.Spec.Selector.MatchLabels, labels) {
		t.Errorf("deployment selector %v does not match its pods %v", d.Spec.Selector.MatchLabels, labels)
	}
	if !subset(m.service.Spec.Selector, labels) {
		t.Errorf("service selector %v does not match the pods %v", m.service.Spec.Selector, labels)
	}
	if labels["llm-d.ai/engine-type"] != "vllm" {
		t.Errorf("pods lack the engine-type label the picker reads metrics names by: %v", labels)
	}
	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("%d containers", len(pod.Spec.Containers))
	}
	c := pod.Spec.Containers[0]
	if len(c.Ports) != 1 || c.Ports[0].Name != "http" {
		t.Fatalf("container ports %v", c.Ports)
	}
	port := c.Ports[0].ContainerPort

	// Readiness only when the model is loaded and while not draining.
	for name, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "readiness": c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/ready" || p.HTTPGet.Port.String() != "http" {
			t.Errorf("%s probe %+v: want GET /ready on http", name, p)
		}
	}
	if c.StartupProbe != nil && time.Duration(c.StartupProbe.PeriodSeconds*c.StartupProbe.FailureThreshold)*time.Second < 5*time.Minute {
		t.Errorf("the startup probe gives a 7B model less than 5 minutes to load")
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Path != "/health" {
		t.Errorf("liveness probe %+v", c.LivenessProbe)
	}

	// Shutdown: preStop, then the drain, within the grace period.
	drain := 30 * time.Second // the server's default
	for i, a := range c.Args {
		if a == "--drain-timeout" && i+1 < len(c.Args) {
			v, err := time.ParseDuration(c.Args[i+1])
			if err != nil {
				t.Fatal(err)
			}
			drain = v
		}
	}
	var preStop time.Duration
	if h := c.Lifecycle; h != nil && h.PreStop != nil && h.PreStop.Sleep != nil {
		preStop = time.Duration(h.PreStop.Sleep.Seconds) * time.Second
	}
	if preStop == 0 {
		t.Error("no preStop sleep: requests still routed here would hit a draining server")
	}
	grace := time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	if preStop+drain+5*time.Second > grace {
		t.Errorf("terminationGracePeriodSeconds %v does not cover preStop %v + drain %v + 5s", grace, preStop, drain)
	}

	// Guaranteed memory, as the plan assumes its budget stays.
	req, lim := c.Resources.Requests.Memory(), c.Resources.Limits.Memory()
	if req.IsZero() || req.Cmp(*lim) != 0 || c.Resources.Requests.Cpu().IsZero() {
		t.Errorf("resources %+v: want memory request = limit and a CPU request", c.Resources)
	}

	// Volumes: adapters shared read-write by all replicas.
	modes := map[string]corev1.PersistentVolumeAccessMode{}
	for _, p := range m.pvcs {
		modes[p.Name] = p.Spec.AccessModes[0]
	}
	for _, v := range pod.Spec.Volumes {
		if v.PersistentVolumeClaim == nil {
			t.Fatalf("volume %s is not a claim", v.Name)
		}
		mode, ok := modes[v.PersistentVolumeClaim.ClaimName]
		if !ok {
			t.Errorf("volume %s claims %s, which is not defined", v.Name, v.PersistentVolumeClaim.ClaimName)
		}
		if v.Name == "adapters" && mode != corev1.ReadWriteMany {
			t.Errorf("the adapter volume is %s: replicas share it, so it must be ReadWriteMany", mode)
		}
	}

	// InferencePool: required fields, its selector picks these pods on
	// the server's port.
	p := m.pool.Spec
	if m.pool.Metadata.Name == "" || p.EndpointPickerRef.Name == "" || len(p.TargetPorts) != 1 || p.TargetPorts[0].Number != port {
		t.Errorf("inference pool %+v (container port %d)", m.pool, port)
	}
	if !subset(p.Selector.MatchLabels, labels) {
		t.Errorf("inference pool selector %v does not match the pods %v", p.Selector.MatchLabels, labels)
	}
	if fm := p.EndpointPickerRef.FailureMode; fm != "" && fm != "FailOpen" && fm != "FailClose" {
		t.Errorf("failureMode %q", fm)
	}

	// HPA: scales the deployment on a series the server exports.
	h := m.hpa.Spec
	if h.ScaleTargetRef.Kind != "Deployment" || h.ScaleTargetRef.Name != d.Name || *h.MinReplicas < 1 || h.MaxReplicas < *h.MinReplicas {
		t.Errorf("hpa %+v", h)
	}
	metrics, _ := os.ReadFile("../serve/metrics.go")
	for _, mt := range h.Metrics {
		if mt.Pods == nil || !bytes.Contains(metrics, []byte(`Name: "`+mt.Pods.Metric.Name+`"`)) {
			t.Errorf("hpa metric %+v is not one the server exports", mt)
		}
	}

	// The server takes every flag passed (the image's entrypoint runs
	// "serve --addr 0.0.0.0:<port>").
	bin, cleanup, err := testutil.BuildBinary("../cmd/sbora-serve")
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	help, _ := exec.Command(bin, "serve", "-h").CombinedOutput()
	for _, a := range c.Args {
		if name, ok := strings.CutPrefix(a, "--"); ok && !bytes.Contains(help, []byte("  -"+name+" ")) && !bytes.Contains(help, []byte("  -"+name+"\n")) {
			t.Errorf("the server has no flag %s", a)
		}
	}
	dockerfile, _ := os.ReadFile("Dockerfile")
	if !bytes.Contains(dockerfile, []byte(`"--addr", "0.0.0.0:`+itoa(port)+`"`)) {
		t.Errorf("the image does not listen on the container port %d", port)
	}
}

func itoa(n int32) string {
	var b []byte
	for {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
		if n == 0 {
			return string(b)
		}
	}
}

// TestGPUCheckScript: the GPU check script parses, and what it builds from
// is in the repository.
func TestGPUCheckScript(t *testing.T) {
	if out, err := exec.Command("bash", "-n", "gpu-check.sh").CombinedOutput(); err != nil {
		t.Fatalf("gpu-check.sh: %v %s", err, out)
	}
	script, _ := os.ReadFile("gpu-check.sh")
	for _, want := range []string{"check --model", "--target ggml-cuda", "model random --preset 7b --layers 2"} {
		if !bytes.Contains(script, []byte(want)) {
			t.Errorf("gpu-check.sh lacks %q", want)
		}
	}
	if _, err := os.Stat("cuda/CMakeLists.txt"); err != nil {
		t.Error(err)
	}
}
