package llama

import (
	"fmt"
	"strings"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/template"
)

// Message is one chat turn.
type Message struct {
	Role    string // system, user or assistant
	Content string
}

// ChatTemplate renders chat messages into a prompt.
//
// The GGUF's tokenizer.chat_template (Jinja) is matched to the closest of
// ollama's Go templates (llama2, llama3, chatml, mistral, ...), as ollama
// does. Without a template, or when none matches, FallbackTemplate is used:
//
//	<system content>\n\n         (if any)
//	User: <content>\n            (each user turn)
//	Assistant: <content>\n       (each assistant turn)
//	Assistant:                   (generation prompt)
//
// with "\nUser:" as a stop sequence.
type ChatTemplate struct {
	Name string // matched ollama template, or "fallback"
	// Stop sequences that end an assistant turn in this format.
	Stop []string
	t    *template.Template
}

// FallbackTemplate is the documented format used when the model has no
// recognisable chat template.
const FallbackTemplate = `{{- range .Messages }}
{{- if eq .Role "system" }}{{ .Content }}

{{ else if eq .Role "user" }}User: {{ .Content }}
{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}
{{ end }}
{{- end }}Assistant:`

// NewChatTemplate picks the model's chat template.
func NewChatTemplate(kv fs.Config) (*ChatTemplate, error) {
	if jinja := kv.String("tokenizer.chat_template"); jinja != "" {
		if named, err := template.Named(jinja); err == nil {
			t, err := template.Parse(string(named.Bytes))
			if err != nil {
				return nil, fmt.Errorf("chat template %s: %w", named.Name, err)
			}
			ct := &ChatTemplate{Name: named.Name, t: t}
			if named.Parameters != nil {
				ct.Stop = named.Parameters.Stop
			}
			return ct, nil
		}
	}
	t, err := template.Parse(FallbackTemplate)
	if err != nil {
		return nil, err
	}
	return &ChatTemplate{Name: "fallback", Stop: []string{"\nUser:"}, t: t}, nil
}

// Render returns the prompt for msgs, ending where the assistant's next
// turn begins.
func (c *ChatTemplate) Render(msgs []Message) (string, error) {
	am := make([]api.Message, len(msgs))
	for i, m := range msgs {
		switch m.Role {
		case "system", "user", "assistant":
		default:
			return "", fmt.Errorf("unsupported message role %q (want system, user or assistant)", m.Role)
		}
		am[i] = api.Message{Role: m.Role, Content: m.Content}
	}
	var b strings.Builder
	if err := c.t.Execute(&b, template.Values{Messages: am}); err != nil {
		return "", err
	}
	return b.String(), nil
}

// EncodePrompt tokenizes a rendered prompt, adding BOS unless the text
// already starts with the BOS token's text (chat templates often do).
func EncodePrompt(m *Model, text string) ([]int32, error) {
	v := m.Tokenizer.Vocabulary()
	addBOS := true
	if len(v.BOS) > 0 && int(v.BOS[0]) < len(v.Values) && strings.HasPrefix(text, v.Values[v.BOS[0]]) {
		addBOS = false
	}
	return m.Tokenizer.Encode(text, addBOS)
}
